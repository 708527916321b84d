"""Reproduce the tiny models shipped with the package: a byte-level BPE tokenizer trained on the Python standard
library's top-level `.py` files, then an MLRA-4 (`modeling_mlra/default_model/`, the embedded default) and an MLA
of the same size (`models/tiny_mla/`) trained on them with `mlra train`, both at once (one CPU thread each).

    python scripts/train_tiny_models.py            # ~15 min on 2 CPU cores; writes build/tiny_models/ too

Fixed seeds and single-threaded training make the run deterministic for a given Python (the corpus is that
Python's standard library; the shipped models used CPython 3.11.7), torch and transformers.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from modeling_mlra import MLRAForCausalLM  # noqa: E402
from modeling_mlra.data import load_tokens, write_bin_tokens  # noqa: E402
from modeling_mlra.eval.perplexity import evaluate_perplexity  # noqa: E402

EOS = "<|endoftext|>"
VOCAB_SIZE = 2048
BLOCK_SIZE = 128
# Perplexities with the authors' protocol (modeling_mlra.eval.perplexity), 8 blocks a batch.
PROTOCOL = dict(block_size=BLOCK_SIZE, batch_size=8, progress=False)
HELDOUT_EVERY, HELDOUT_OFFSET = 16, 8  # file i (sorted by name) is held out when i % 16 == 8
FIXTURE_CHARS = 40_000
# The same sizes for both models, so they have exactly the same parameter count.
MODEL_SIZE = [
    "--hidden-size", "192", "--num-layers", "4", "--num-heads", "4", "--intermediate-size", "512",
    "--q-lora-rank", "96", "--kv-lora-rank", "128", "--qk-nope-head-dim", "32", "--qk-rope-head-dim", "16",
]  # fmt: skip
MODELS = {"mlra_4": REPO / "modeling_mlra" / "default_model", "mla": REPO / "models" / "tiny_mla"}
SHIPPED_FILES = ("generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def ship(trained: Path, destination: Path) -> None:
    """Copy a trained model into a shipped folder: weights, tokenizer and configs, no modeling files. Its config.json
    drops `auto_map` (which would name modules the folder lacks): the package's registered classes load it."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        shutil.copy(trained / name, destination / name)
    config = json.loads((trained / "config.json").read_text())
    config.pop("auto_map", None)
    (destination / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def split_stdlib() -> tuple[list[Path], list[Path]]:
    """The standard library's top-level .py files, sorted by name: (training files, held-out files)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    heldout = [f for i, f in enumerate(files) if i % HELDOUT_EVERY == HELDOUT_OFFSET]
    return [f for f in files if f not in heldout], heldout


def train_tokenizer(files: list[Path], output_dir: Path) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style, so any text round-trips) with one special token ending each document."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train([str(f) for f in files], trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    wrapped.save_pretrained(output_dir)
    return wrapped


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / "build" / "tiny_models")
    parser.add_argument("--max-steps", type=int, default=800)
    options = parser.parse_args()
    work = options.work_dir
    work.mkdir(parents=True, exist_ok=True)

    train_files, heldout_files = split_stdlib()
    tokenizer = train_tokenizer(train_files, work / "tokenizer")
    for name, files in (("train", train_files), ("val", heldout_files)):
        write_bin_tokens(work / f"{name}.bin", load_tokens(files, tokenizer))
    heldout_text = "".join(f.read_text(encoding="utf-8") for f in heldout_files)
    fixture = heldout_text[: heldout_text.rindex("\n", 0, FIXTURE_CHARS) + 1]
    (REPO / "tests" / "fixtures" / "heldout_python.txt").write_text(fixture, encoding="utf-8")

    commands, logs = {}, {}
    relative = lambda path: os.path.relpath(path, REPO)  # noqa: E731 (commands run in REPO; recorded as typed)
    for variant in MODELS:
        commands[variant] = [
            "mlra", "train", "--variant", variant, *MODEL_SIZE, "--tokenizer", relative(work / "tokenizer"),
            "--train-data", relative(work / "train.bin"), "--eval-data", relative(work / "val.bin"),
            "--block-size", str(BLOCK_SIZE), "--batch-size", "16", "--max-steps", str(options.max_steps),
            "--learning-rate", "2e-3", "--warmup-steps", "50", "--eval-steps", "400", "--save-steps", "400",
            "--logging-steps", "20", "--seed", "0", "--no-progress-bar", "--output-dir", relative(work / variant),
        ]  # fmt: skip
    # Both models train at once, one thread each: on 2 cores that beats two threads each in turn.
    start = time.time()
    processes = {}
    for variant, command in commands.items():
        logs[variant] = open(work / f"{variant}.log", "w")
        cli = [sys.executable, "-m", "modeling_mlra.cli", *command[1:]]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        processes[variant] = subprocess.Popen(cli, stdout=logs[variant], stderr=subprocess.STDOUT, env=env, cwd=REPO)
    for variant, process in processes.items():
        if process.wait() != 0:
            raise SystemExit(f"training {variant} failed: see {work / f'{variant}.log'}")
    wall_time = time.time() - start

    results = {"wall_time_s": round(wall_time), "python": sys.version.split()[0], "models": {}}
    val_tokens = load_tokens([work / "val.bin"])
    fixture_tokens = load_tokens([REPO / "tests" / "fixtures" / "heldout_python.txt"], tokenizer)
    for variant, destination in MODELS.items():
        ship(work / variant, destination)
        model = MLRAForCausalLM.from_pretrained(destination)
        results["models"][variant] = {
            "folder": str(destination.relative_to(REPO)),
            "command": " ".join(commands[variant]),
            "parameters": model.num_parameters(),
            "weights_bytes": (destination / "model.safetensors").stat().st_size,
            "val_perplexity": round(evaluate_perplexity(model, val_tokens, **PROTOCOL).perplexity, 3),
            "fixture_perplexity": round(evaluate_perplexity(model, fixture_tokens, **PROTOCOL).perplexity, 3),
        }
    results.update(train_tokens=len(load_tokens([work / "train.bin"])), val_tokens=len(val_tokens))
    results.update(heldout_files=[f.name for f in heldout_files], vocab_size=len(tokenizer))
    (REPO / "modeling_mlra" / "default_model" / "training_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
