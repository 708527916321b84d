"""The tiny models shipped with the repository: the embedded MLRA-4 default and the MLA trained beside it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from modeling_mlra import MLRAForCausalLM  # noqa: E402
from modeling_mlra.cli import DEFAULT_MODEL  # noqa: E402
from modeling_mlra.data import load_tokens  # noqa: E402
from modeling_mlra.eval.perplexity import evaluate_perplexity  # noqa: E402

RESULTS = json.loads((DEFAULT_MODEL / "training_results.json").read_text())
SHIPPED_MODEL_FOLDERS = [ROOT / recorded["folder"] for _, recorded in sorted(RESULTS["models"].items())]
PROMPT = "def f(x):"
HELDOUT = Path(__file__).parent / "fixtures" / "heldout_python.txt"  # the first held-out stdlib files, verbatim


def test_embedded_model_and_tokenizer_load_from_local_files_only():
    model = MLRAForCausalLM.from_pretrained(DEFAULT_MODEL, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL, local_files_only=True)
    assert model.config.variant == "mlra_4"
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.decode(tokenizer("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"


def test_embedded_weights_file_is_at_most_10_mb():
    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size <= 10 * 1024**2


@pytest.mark.parametrize("variant", sorted(RESULTS["models"]))
def test_heldout_perplexity_stays_within_10_percent_of_the_recorded_value(variant):
    recorded = RESULTS["models"][variant]
    folder = ROOT / recorded["folder"]
    model = MLRAForCausalLM.from_pretrained(folder, local_files_only=True)
    tokens = load_tokens([HELDOUT], AutoTokenizer.from_pretrained(folder, local_files_only=True))
    result = evaluate_perplexity(model, tokens, block_size=model.config.max_position_embeddings, batch_size=8)
    assert result.perplexity <= 1.1 * recorded["fixture_perplexity"]


def folder_id(folder: Path) -> str:
    return str(folder.relative_to(ROOT))


@pytest.mark.parametrize("folder", SHIPPED_MODEL_FOLDERS, ids=folder_id)
def test_shipped_folders_hold_no_modeling_code_and_load_through_the_package_with_trust_remote_code(folder):
    """The shipped folders carry weights, configs and tokenizer only: no .py files and no `auto_map` naming any.
    With the package imported, the registered classes load them, with or without `trust_remote_code=True`."""
    assert not list(folder.glob("*.py"))
    assert "auto_map" not in json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert type(model) is MLRAForCausalLM


def test_shipped_models_saved_with_save_pretrained_generate_the_same_tokens_without_the_package(tmp_path):
    """save_pretrained writes `auto_map` and the modeling files: one fresh process (isolated, outside the repository)
    that never imports the package loads every shipped model saved that way and generates the package's greedy
    tokens."""
    saved, expected = [], []
    for folder in SHIPPED_MODEL_FOLDERS:
        model = MLRAForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        copy = tmp_path / folder.name
        model.save_pretrained(copy)
        tokenizer.save_pretrained(copy)
        assert json.loads((copy / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
            "modeling_mlra.MLRAForCausalLM"
        )
        saved.append(str(copy))
        inputs = tokenizer(PROMPT, return_tensors="pt")
        expected.append(model.generate(**inputs, max_new_tokens=8, do_sample=False)[0].tolist())
    script = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"for folder in {saved!r}:\n"
        "    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)\n"
        "    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)\n"
        "    output = model.generate(**tokenizer(PROMPT, return_tensors='pt'), max_new_tokens=8, do_sample=False)\n"
        "    print('generated', type(model).__module__, *output[0].tolist())\n"
        "assert not any(name.split('.')[0] == 'modeling_mlra' for name in sys.modules), 'the package was imported'\n"
    ).replace("PROMPT", repr(PROMPT))
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-I", "-c", script],
        env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    generated = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("generated ")]
    assert [module.startswith("transformers_modules.") for module, *_ in generated] == [True] * len(saved)
    assert [[int(token) for token in tokens] for _, *tokens in generated] == expected
