"""The tiny models shipped with the repository: the embedded MLRA-4 default and the MLA trained beside it."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoTokenizer  # noqa: E402

from modeling_mlra import MLRAForCausalLM  # noqa: E402
from modeling_mlra.cli import DEFAULT_MODEL  # noqa: E402
from modeling_mlra.data import load_tokens, perplexity  # noqa: E402

RESULTS = json.loads((DEFAULT_MODEL / "training_results.json").read_text())
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
    assert perplexity(model, tokens, block_size=model.config.max_position_embeddings) <= 1.1 * recorded[
        "fixture_perplexity"
    ]
