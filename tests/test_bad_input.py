"""Bad input gets one line naming the file, key, field or argument (exit code 2 on the command line), never a
traceback or a silently wrong model: conversion, the other `mlra` commands, configs and the model's API."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_model

from modeling_mlra import MLRAConfig, MLRAForCausalLM
from modeling_mlra.cli import DEFAULT_MODEL
from modeling_mlra.cli import main as mlra_main
from test_eval import task_dir  # noqa: F401 (a fixture)

REFERENCE = Path(__file__).parent / "fixtures" / "reference"


def error_line(capsys, *argv) -> str:
    """Run `mlra` in this process: exit code 2 and one error line, the last on stderr, without a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        mlra_main([*map(str, argv)])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith(f"mlra {argv[0]}: error: ")]
    assert len(errors) == 1 and stderr.endswith(errors[0] + "\n") and "Traceback" not in stderr, stderr
    return errors[0]


def copy_reference(variant: str, folder: Path, **config_changes) -> Path:
    shutil.copytree(REFERENCE / variant, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory) -> Path:
    """A saved model with a 64-token vocabulary."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model().save_pretrained(folder)
    return folder


# --- mlra convert ------------------------------------------------------------------------------------------------


def test_convert_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path, capsys):
    line = error_line(capsys, "convert", "original", REFERENCE / "mla", tmp_path / "out", "--tokenizer", DEFAULT_MODEL)
    assert f"the tokenizer {DEFAULT_MODEL} has 2048 tokens but the model's vocabulary holds 128" in line
    assert not (tmp_path / "out").exists()


def test_convert_names_a_non_integer_field_of_the_authors_config(tmp_path, capsys):
    src = copy_reference("mla", tmp_path / "src", n_layer="two")
    line = error_line(capsys, "convert", "original", src, tmp_path / "out")
    assert line.endswith(f"{src / 'config.json'}: n_layer='two' must be a positive integer")


def test_convert_refuses_tp_options_with_mode_exact(tmp_path, capsys):
    line = error_line(capsys, "convert", "mla", REFERENCE / "mla", tmp_path / "out", "--mode", "exact", "--blocks", "2")
    assert line.endswith("--blocks: only for --mode tp (--mode exact converts into MLA as it is)")


def test_convert_names_a_shard_size_it_cannot_read(tmp_path, capsys):
    line = error_line(capsys, "convert", "original", REFERENCE / "mla", tmp_path / "out", "--max-shard-size", "lots")
    assert line.endswith("--max-shard-size lots: not a size such as 5GB, 500MB or 100KB")


def test_convert_refuses_an_lm_head_that_differs_from_the_tied_embedding(tmp_path, capsys):
    src = copy_reference("mla", tmp_path / "src")
    state_dict = torch.load(src / "pytorch_model.bin", weights_only=True)
    state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"].clone() * 2
    torch.save(state_dict, src / "pytorch_model.bin")
    line = error_line(capsys, "convert", "original", src, tmp_path / "out")
    assert f"{src / 'pytorch_model.bin'}: lm_head.weight differs from transformer.wte.weight" in line


def test_convert_warns_that_a_variant_inferred_from_shapes_may_be_a_no_scale_ablation(tmp_path, caplog):
    src = copy_reference("mla_no_scale", tmp_path / "checkpoint")
    assert mlra_main(["convert", "original", str(src), str(tmp_path / "out")]) is None
    assert "convert again with --variant mla_no_scale" in caplog.text
    assert json.loads((tmp_path / "out" / "config.json").read_text())["variant"] == "mla"


def test_push_to_hub_while_offline_is_refused_before_converting(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    line = error_line(capsys, "convert", "original", REFERENCE / "mla", tmp_path / "out", "--push-to-hub", "me/mla")
    assert line.endswith("--push-to-hub me/mla: HF_HUB_OFFLINE is set; unset it to upload")
    assert not (tmp_path / "out").exists()


def test_push_to_hub_to_an_unreachable_hub_is_one_line_and_keeps_the_folder(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    line = error_line(capsys, "convert", "original", REFERENCE / "mla", tmp_path / "out", "--push-to-hub", "me/mla")
    assert "--push-to-hub me/mla: the upload failed" in line and f"the converted folder is {tmp_path / 'out'}" in line
    assert (tmp_path / "out" / "config.json").exists()


def test_convert_from_a_hub_repo_with_the_hub_unreachable_says_so_at_once(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    line = error_line(capsys, "convert", "original", "Soughing/MLRA", tmp_path / "out", "--subfolder", "main/mlra_4")
    assert "SRC Soughing/MLRA: the Hugging Face Hub (http://127.0.0.1:9) is unreachable" in line
    assert not (tmp_path / "out").exists()


# --- mlra generate and mlra eval ---------------------------------------------------------------------------------


def test_generate_refuses_a_negative_seed(capsys):
    assert error_line(capsys, "generate", "--seed", "-1").endswith("--seed -1: must be in [0, 2**32) (numpy's and torch's seed range)")


def test_generate_names_a_prompt_byte_that_is_not_utf8(capsys):
    # what Python makes of the bytes b"ab\xffc" on the command line
    line = error_line(capsys, "generate", "--prompt", "ab\udcffc")
    assert line.endswith("--prompt: byte 0xff at position 2 is not UTF-8: pass the text in UTF-8")


def test_generate_from_a_hub_repo_with_the_hub_unreachable_says_so_at_once(capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    line = error_line(capsys, "generate", "--model", "someone/some-model")
    assert "--model someone/some-model: the Hugging Face Hub (http://127.0.0.1:9) is unreachable" in line
    assert "set HF_HUB_OFFLINE=1 to use the local Hugging Face cache only" in line


def test_eval_tasks_refuses_a_tokenizer_larger_than_the_vocabulary(capsys, tiny_model_folder, task_dir):  # noqa: F811
    line = error_line(capsys, "eval", "tasks", "--model", tiny_model_folder, "--tokenizer", DEFAULT_MODEL,
                      "--tasks", "tiny_choice", "--include-path", task_dir, "--device", "cpu")  # fmt: skip
    assert f"--tokenizer {DEFAULT_MODEL} has 2048 tokens but the model's vocabulary holds 64" in line


def test_eval_ppl_names_a_data_file_that_is_not_utf8(capsys, tmp_path):
    data = tmp_path / "latin1.txt"
    data.write_bytes("café au lait ".encode("latin-1") * 50)
    line = error_line(capsys, "eval", "ppl", "--data", data, "--device", "cpu", "--block-size", "8", "--batch-size", "1")
    assert f"--data {data}: 'utf-8' codec can't decode" in line


# --- configs and the model's API ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, rule",
    [
        ("rope_theta", -1.0, "MLRAConfig.rope_parameters: rope_theta=-1.0 must be a number above 0"),
        ("kv_lora_rank", 0, "must be a positive integer"),
        ("hidden_size", -1, "must be a positive integer"),
        ("hidden_size", "192", "must be a positive integer"),
        ("num_hidden_layers", 0, "must be a positive integer"),
        ("vocab_size", 0, "must be a positive integer"),
        ("max_position_embeddings", 0, "must be a positive integer"),
        ("num_latent_blocks", 0, "must be a positive integer"),
        ("rms_norm_eps", -1, "must be a number above 0"),
        ("pad_token_id", 5000, "must be a token id in [0, vocab_size=64)"),
        ("variant", "mla", "needs num_latent_blocks=1, but the config has 4"),
    ],
)
def test_config_refuses_an_impossible_value_naming_the_field(field, value, rule):
    with pytest.raises(ValueError) as error:
        tiny_config(**{field: value})
    assert str(error.value).startswith(rule if field == "rope_theta" else f"MLRAConfig.{field}={value!r}")
    assert rule in str(error.value)


def test_config_refuses_a_no_scale_variant_with_the_scaled_variants_scales():
    scaled = MLRAConfig.from_variant("mlra_4").to_dict()
    with pytest.raises(ValueError, match=r"variant='mlra_4_no_scale' needs q_latent_scale=1.0, but the config has"):
        MLRAConfig.from_dict({**scaled, "variant": "mlra_4_no_scale"})


@pytest.mark.parametrize("change", [{"rope_theta": -1}, {"variant": "mla"}])
def test_from_pretrained_refuses_a_config_json_that_contradicts_itself_or_the_weights(tmp_path, tiny_model_folder, change):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    if "rope_theta" in change:
        config["rope_parameters"] = {**config["rope_parameters"], "rope_theta": change["rope_theta"]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"MLRAConfig.*{next(iter(change))}="):
        MLRAForCausalLM.from_pretrained(folder)


def test_an_empty_input_is_refused_by_forward_and_generate():
    model = tiny_model()
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"the input holds no tokens \(shape \[1, 0\]\)"):
        model(empty)
    with pytest.raises(ValueError, match=r"the input holds no tokens"):
        model.generate(empty, max_new_tokens=2)
