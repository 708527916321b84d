"""The `mlra` command line, run as a user runs it: a subprocess on the CPU, offline."""

import os
import re
import subprocess
import sys
from pathlib import Path

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


def test_generate_samples_reproducibly_with_a_seed():
    options = ("generate", "--prompt", "import os", "--max-new-tokens", "8", "--do-sample", "--seed", "3")
    first, second = run_cli(*options), run_cli(*options)
    assert first.returncode == 0, first.stderr
    assert first.stdout.rpartition("\n[")[0] == second.stdout.rpartition("\n[")[0]


def test_generate_on_a_checkpoint_without_tokenizer_names_it_when_gpt2_is_not_cached(tmp_path):
    result = run_cli("generate", "--model", str(AUTHORS_CHECKPOINT), HF_HOME=str(tmp_path))
    assert result.returncode != 0
    assert str(AUTHORS_CHECKPOINT) in result.stderr and "--tokenizer" in result.stderr
