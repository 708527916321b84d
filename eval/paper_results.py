"""The paper's reported numbers (its Table 3 perplexities and Table 4 zero-shot accuracies, every variant), kept in
one data file, `paper_results.json`, next to this module. Its "schema" entry documents the layout."""

import json
from functools import cache
from pathlib import Path

PAPER_RESULTS_FILE = Path(__file__).with_name("paper_results.json")


@cache
def load_paper_results() -> dict:
    """The contents of `paper_results.json`: {"source", "schema", "variant_labels", "zero_shot": {"tasks",
    "task_labels", "metrics", "num_fewshot", "rows"}, "perplexity": {"datasets", "files", "block_size", "rows"}}.
    Rows are keyed by the authors' variant names (`mla`, `gla_2`, `mlra_4`, ...)."""
    return json.loads(PAPER_RESULTS_FILE.read_text(encoding="utf-8"))
