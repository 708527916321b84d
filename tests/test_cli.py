"""The `mlra` command line, run as a user runs it: a subprocess on the CPU, offline."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model

from modeling_mlra.cli import DEFAULT_MODEL, decoding_options, main
from modeling_mlra.data import write_bin_tokens

ROOT = Path(__file__).resolve().parents[1]
AUTHORS_CHECKPOINT = ROOT / "tests" / "fixtures" / "reference" / "mlra_4"


def run_cli(*args, **env):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "modeling_mlra.cli", *args],
        capture_output=True, text=True, env=environment, cwd=ROOT, timeout=120,
    )  # fmt: skip


def test_generate_without_a_model_streams_the_embedded_model_and_reports_tokens_per_second():
    result = run_cli("generate", "--max-new-tokens", "12", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    text, _, report = result.stdout.rpartition("\n[")
    assert text.startswith("def fibonacci(n):") and len(text) > len("def fibonacci(n):")
    assert re.fullmatch(r"\d+ tokens in [\d.]+ s: [\d.]+ tokens/s on cpu, float32\]\n", report), report


def test_generate_on_gpus_decodes_on_a_static_cache_with_the_compiled_step_unless_told_not_to():
    assert decoding_options("cuda", compile=True) == dict(cache_implementation="static")  # one GPU or a rank's
    assert decoding_options("cuda:1", compile=True) == dict(cache_implementation="static")
    assert decoding_options("cuda", compile=False) == {}
    assert decoding_options("cpu", compile=True) == {}


def test_generate_samples_reproducibly_with_a_seed():
    options = ("generate", "--prompt", "import os", "--max-new-tokens", "8", "--do-sample", "--seed", "3")
    first, second = run_cli(*options), run_cli(*options)
    assert first.returncode == 0, first.stderr
    assert first.stdout.rpartition("\n[")[0] == second.stdout.rpartition("\n[")[0]


def test_generate_on_a_checkpoint_without_tokenizer_names_it_when_gpt2_is_not_cached(tmp_path):
    result = run_cli("generate", "--model", str(AUTHORS_CHECKPOINT), HF_HOME=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.endswith(
        f"mlra generate: error: --model {AUTHORS_CHECKPOINT} has no tokenizer and the GPT-2 tokenizer is not in the "
        "local Hugging Face cache: pass --tokenizer (e.g. openai-community/gpt2)\n"
    )


# --- bad arguments: one line naming the cause, exit code 2, no traceback ------------------------------------------


def error_line(capsys, argv: list[str]) -> str:
    """Run `mlra` in this process; it must exit with code 2 after one error line on stderr (after any progress bars
    and warnings of the loading), without a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith(f"mlra {argv[0]}: error: ")]
    assert len(errors) == 1 and stderr.endswith(errors[0] + "\n") and "Traceback" not in stderr, stderr
    return errors[0]


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory) -> Path:
    """A saved model with a 64-token vocabulary and a 32-token context."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model(max_position_embeddings=32).save_pretrained(folder)
    return folder


def test_generate_on_a_missing_folder_says_it_does_not_exist(capsys):
    line = error_line(capsys, ["generate", "--model", "/nonexistent"])
    assert line == "mlra generate: error: --model /nonexistent: the folder does not exist"


def test_generate_on_a_file_says_it_is_not_a_folder(capsys, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    assert "is a file, not a folder" in error_line(capsys, ["generate", "--model", str(tmp_path / "weights.bin")])


def test_generate_with_a_missing_subfolder_names_it(capsys):
    line = error_line(capsys, ["generate", "--model", str(AUTHORS_CHECKPOINT.parent), "--subfolder", "mlra_9"])
    assert "no subfolder 'mlra_9'" in line


def test_generate_on_a_folder_without_a_model_names_the_folder(capsys, tmp_path):
    line = error_line(capsys, ["generate", "--model", str(tmp_path), "--tokenizer", str(DEFAULT_MODEL)])
    assert line.startswith(f"mlra generate: error: --model {tmp_path}: ")


def test_generate_with_a_missing_tokenizer_folder_says_it_does_not_exist(capsys):
    line = error_line(capsys, ["generate", "--tokenizer", "./no_tokenizer_here"])
    assert line.endswith("--tokenizer ./no_tokenizer_here: the folder does not exist")


def test_generate_with_a_tokenizer_larger_than_the_vocabulary_names_both_sizes(capsys, tiny_model_folder):
    line = error_line(capsys, ["generate", "--model", str(tiny_model_folder), "--tokenizer", str(DEFAULT_MODEL)])
    assert f"--tokenizer {DEFAULT_MODEL} has 2048 tokens but the model's vocabulary holds 64" in line


def test_generate_with_a_prompt_longer_than_the_context_names_the_context(capsys):
    line = error_line(capsys, ["generate", "--prompt", "x = 1\n" * 100, "--max-new-tokens", "1"])
    assert "exceed the model's context of 128 tokens" in line and "shorten the prompt" in line


def test_generate_past_the_context_asks_for_fewer_new_tokens(capsys):
    line = error_line(capsys, ["generate", "--max-new-tokens", "200"])
    assert "--max-new-tokens 200 exceed the model's context of 128 tokens" in line


def test_generate_with_an_empty_prompt_asks_for_text(capsys):
    assert "--prompt is empty" in error_line(capsys, ["generate", "--prompt", ""])


@pytest.mark.parametrize(
    "option, value, rule",
    [
        ("--max-new-tokens", "0", "must be at least 1"),
        ("--temperature", "0", "must be above 0"),
        ("--top-p", "1.5", "must be in (0, 1]"),
        ("--top-k", "-1", "must be at least 0"),
        ("--device", "tpu9", "Invalid device string"),
        ("--device", "cuda:99", "CUDA device(s)"),
    ],
)
def test_generate_with_an_impossible_option_value_names_the_option(capsys, option, value, rule):
    line = error_line(capsys, ["generate", option, value])
    assert line.startswith(f"mlra generate: error: {option} {value}") and rule in line


def train_argv(tmp_path, *options) -> list[str]:
    """`mlra train` of a tiny MLRA-4 on a 64-token vocabulary, with `options` added."""
    sizes = [
        "--hidden-size", "32", "--num-layers", "1", "--num-heads", "4", "--intermediate-size", "32",
        "--q-lora-rank", "16", "--kv-lora-rank", "16", "--qk-nope-head-dim", "8", "--qk-rope-head-dim", "4",
    ]  # fmt: skip
    return ["train", *sizes, "--max-steps", "1", "--output-dir", str(tmp_path / "out"), *options]


@pytest.fixture
def shard(tmp_path) -> Path:
    """600 tokens with ids 0..59 in the authors' .bin format."""
    write_bin_tokens(tmp_path / "train.bin", np.arange(600) % 60)
    return tmp_path / "train.bin"


def test_train_on_a_missing_data_file_names_it(capsys, tmp_path):
    line = error_line(capsys, train_argv(tmp_path, "--train-data", str(tmp_path / "missing.bin")))
    assert line == f"mlra train: error: --train-data {tmp_path / 'missing.bin'}: the file does not exist"


def test_train_on_a_missing_eval_file_names_it(capsys, tmp_path, shard):
    line = error_line(capsys, train_argv(tmp_path, "--train-data", str(shard), "--eval-data", "val.bin"))
    assert "--eval-data val.bin: the file does not exist" in line


def test_train_on_text_without_a_tokenizer_asks_for_one(capsys, tmp_path):
    (tmp_path / "train.txt").write_text("def f(x):\n    return x\n")
    line = error_line(capsys, train_argv(tmp_path, "--train-data", str(tmp_path / "train.txt")))
    assert "is a text file: pass --tokenizer" in line


def test_train_with_a_tokenizer_larger_than_the_vocabulary_names_both_sizes(capsys, tmp_path, shard):
    argv = train_argv(tmp_path, "--train-data", str(shard), "--tokenizer", str(DEFAULT_MODEL), "--vocab-size", "64")
    assert "has 2048 tokens but the model's vocabulary holds 64" in error_line(capsys, argv)


def test_train_on_token_ids_beyond_the_vocabulary_names_the_id(capsys, tmp_path, shard):
    line = error_line(capsys, train_argv(tmp_path, "--train-data", str(shard), "--vocab-size", "32"))
    assert "token id 59" in line and "vocab_size is 32" in line


def test_train_from_a_missing_checkpoint_says_it_does_not_exist(capsys, tmp_path, shard):
    argv = ["train", "--init-from", "/nonexistent/model", "--train-data", str(shard), "--max-steps", "1"]
    line = error_line(capsys, [*argv, "--output-dir", str(tmp_path / "out")])
    assert line.endswith("--init-from /nonexistent/model: the folder does not exist")


def test_train_resume_without_a_checkpoint_names_the_output_directory(capsys, tmp_path, shard):
    line = error_line(capsys, train_argv(tmp_path, "--train-data", str(shard), "--vocab-size", "64", "--resume"))
    assert f"no checkpoint-* folder in output directory {tmp_path / 'out'}" in line


def test_train_an_unknown_variant_lists_the_known_ones(capsys, tmp_path, shard):
    line = error_line(capsys, train_argv(tmp_path, "--train-data", str(shard), "--variant", "mlra_3"))
    assert "unknown variant 'mlra_3'" in line and "mlra_4_gated" in line


def test_train_impossible_sizes_name_the_field(capsys, tmp_path, shard):
    argv = train_argv(tmp_path, "--train-data", str(shard), "--variant", "mlra_2", "--num-heads", "3")
    assert "MLRAConfig.num_attention_heads=3 must be divisible" in error_line(capsys, argv)


def test_train_with_a_block_larger_than_the_data_names_both(capsys, tmp_path, shard):
    argv = train_argv(tmp_path, "--train-data", str(shard), "--vocab-size", "64", "--block-size", "1000")
    assert "600 tokens are fewer than one block of 1000" in error_line(capsys, argv)


def test_train_zero_steps_names_the_option(capsys, tmp_path, shard):
    argv = train_argv(tmp_path, "--train-data", str(shard), "--vocab-size", "64")
    argv[argv.index("--max-steps") + 1] = "0"
    assert "--max-steps 0: must be at least 1" in error_line(capsys, argv)
