"""The tiny models shipped with the repository: the embedded MLRA-4 default and the MLA trained beside it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from conftest import tiny_model  # noqa: E402
from refresh_model_folders import SHIPPED_MODEL_FOLDERS  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from modeling_mlra import MLRAForCausalLM  # noqa: E402
from modeling_mlra.cli import DEFAULT_MODEL  # noqa: E402
from modeling_mlra.data import load_tokens  # noqa: E402
from modeling_mlra.eval.perplexity import evaluate_perplexity  # noqa: E402

RESULTS = json.loads((DEFAULT_MODEL / "training_results.json").read_text())
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
def test_shipped_modeling_files_are_those_save_pretrained_writes_from_the_current_sources(folder, tmp_path):
    """The copies beside the weights must follow every change of the package: save_pretrained decides which modules
    go (transformers' relative-import discovery) and the shipped folder must hold exactly those, byte for byte."""
    tiny_model().save_pretrained(tmp_path)
    written = {path.name: path.read_bytes() for path in tmp_path.glob("*.py")}
    shipped = {path.name: path.read_bytes() for path in folder.glob("*.py")}
    stale = sorted(name for name in written.keys() | shipped.keys() if written.get(name) != shipped.get(name))
    assert not stale, f"{folder_id(folder)}: {stale} differ from the package; run python scripts/refresh_model_folders.py"
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert json.loads((folder / "config.json").read_text()).get("auto_map") == auto_map


def test_shipped_folders_load_and_generate_with_trust_remote_code_and_without_the_package(tmp_path):
    """One fresh process (isolated, outside the repository) that never imports the package loads every shipped
    folder through its own modeling files and generates the package's greedy tokens."""
    script = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"for folder in {[str(folder) for folder in SHIPPED_MODEL_FOLDERS]!r}:\n"
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
    assert len(generated) == len(SHIPPED_MODEL_FOLDERS)
    for folder, (module, *tokens) in zip(SHIPPED_MODEL_FOLDERS, generated):
        assert module.startswith("transformers_modules."), folder
        model = MLRAForCausalLM.from_pretrained(folder)
        inputs = AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt")
        expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0].tolist()
        assert [int(token) for token in tokens] == expected, folder
