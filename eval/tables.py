"""Tables laid out like the paper's: zero-shot accuracy (its Table 4) and perplexity (its Table 3), each with the
row the authors report for the evaluated variant."""

import re

from .paper_results import load_paper_results

MISSING = "-"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with every column padded to its widest cell."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    return "\n".join([line(header), line(["-" * width for width in widths]), *map(line, rows)])


def paper_label(variant: str) -> str:
    return f"{load_paper_results()['variant_labels'][variant]} (paper)"


def zero_shot_table(results: dict, label: str, variant: str | None) -> str:
    """The paper's Table 4 layout from lm-eval's `results` (accuracies in percent, each task with the paper's
    metric), with the authors' row for `variant` when the paper reports one."""
    paper = load_paper_results()["zero_shot"]
    tasks, metrics = paper["tasks"], paper["metrics"]
    scores = [100 * results["results"][task][f"{metrics[task]},none"] for task in tasks]
    rows = [[label, *(f"{score:.2f}" for score in scores), f"{sum(scores) / len(scores):.2f}"]]
    if variant in paper["rows"]:
        reported = paper["rows"][variant]
        rows.append([paper_label(variant), *(f"{reported[task]:.2f}" for task in tasks), f"{reported['avg']:.2f}"])
    header = ["Model", *(paper["task_labels"][task] for task in tasks), "Avg"]
    return markdown_table(header, rows)


def _normalized(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def paper_dataset(file_name: str) -> str | None:
    """The paper's perplexity dataset an evaluation file holds, by name: `C4_eval.bin` and `c4.txt` are C4."""
    stem = _normalized(re.sub(r"(_eval)?\.[^.]+$", "", file_name))
    return next((d for d in load_paper_results()["perplexity"]["datasets"] if _normalized(d) == stem), None)


def perplexity_table(results: dict[str, dict], label: str, variant: str | None) -> str:
    """The paper's Table 3 layout from `{file name: {"perplexity", ...}}`: one column per file (named after its
    dataset when it is one of the paper's), an Avg column for several files, and the authors' row for `variant`
    under the columns whose dataset the paper reports."""
    paper = load_paper_results()["perplexity"]
    names = list(results)
    datasets = [paper_dataset(name) for name in names]
    header = ["Model", *(dataset or name for dataset, name in zip(datasets, names))]

    def row(row_label, values):
        cells = [MISSING if value is None else f"{value:.3f}" for value in values]
        if len(values) > 1:
            cells.append(MISSING if None in values else f"{sum(values) / len(values):.3f}")
        return [row_label, *cells]

    rows = [row(label, [results[name]["perplexity"] for name in names])]
    if variant in paper["rows"] and any(datasets):
        rows.append(row(paper_label(variant), [paper["rows"][variant].get(dataset) for dataset in datasets]))
    return markdown_table(header + (["Avg"] if len(names) > 1 else []), rows)
