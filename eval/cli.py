"""`mlra eval tasks` (lm-eval tasks, `paper` = the paper's zero-shot table) and `mlra eval ppl` (the authors'
perplexity protocol). lm-eval and the model load inside the commands, so that other `mlra` commands start fast.

    mlra eval tasks --model Soughing/MLRA --subfolder main/mlra_4 --tasks paper --batch-size 16
    mlra eval ppl --model Soughing/MLRA --subfolder main/mlra_4 --data eval_datasets/*.bin --batch-size 16
"""

import argparse
import json
import time
from pathlib import Path

from modeling_mlra.arguments import (
    CommandLineError,
    check_at_least,
    check_files,
    check_model_location,
    check_vocabulary_fits,
    reported_as,
)

from .perplexity import DEFAULT_MAX_TOKENS


def batch_size(value: str) -> int | str:
    """lm-eval's batch size: an integer or 'auto'."""
    return value if value == "auto" else int(value)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from modeling_mlra.cli import DEFAULT_MODEL, add_device_arguments

    commands = parser.add_subparsers(dest="eval_command", required=True)
    tasks = commands.add_parser("tasks", help="lm-eval tasks; --tasks paper: the paper's zero-shot table")
    ppl = commands.add_parser("ppl", help="perplexity with the authors' protocol, on their .bin files or text")
    for sub in (tasks, ppl):
        sub.add_argument(
            "--model",
            default=str(DEFAULT_MODEL),
            help="local folder or Hub repo id, our format or the authors' (default: the embedded tiny model)",
        )
        sub.add_argument("--subfolder", default="", help="folder inside --model holding the checkpoint")
        sub.add_argument(
            "--tokenizer",
            help="tokenizer folder or Hub id (default: the model's own, else GPT-2's from the local cache)",
        )
        sub.add_argument("--output-json", type=Path, help="write the results to this JSON file")
        add_device_arguments(sub)
    tasks.add_argument(
        "--tasks",
        required=True,
        help="'paper' (ARC-E, ARC-C, OpenBookQA, BoolQ, HellaSwag, Winogrande, PIQA, zero-shot) or lm-eval task "
        "names separated by commas",
    )
    tasks.add_argument("--include-path", help="folder of extra lm-eval task YAML files")
    tasks.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's; paper: 0)")
    tasks.add_argument("--limit", type=float, help="evaluate only this many documents per task (or a fraction)")
    tasks.add_argument("--batch-size", type=batch_size, default=1, help="an integer or 'auto'")
    tasks.add_argument("--log-samples", action="store_true", help="keep every document's responses in --output-json")
    ppl.add_argument("--data", nargs="+", required=True, type=Path, help=".bin (the authors' format), .jsonl or text")
    ppl.add_argument("--block-size", type=int, default=2048)
    ppl.add_argument("--batch-size", type=int, default=6, help="blocks per batch (the authors' default: 6)")
    ppl.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens evaluated per file at most")
    ppl.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_eval(options: argparse.Namespace) -> None:
    """`mlra eval tasks|ppl`; a bad argument or input raises CommandLineError (`mlra` prints one line, exit code 2)."""
    check_model_location("--model", options.model, options.subfolder)
    if options.tokenizer is not None:
        check_model_location("--tokenizer", options.tokenizer)
    check_at_least("--batch-size", None if options.batch_size == "auto" else options.batch_size, 1)
    if options.eval_command == "tasks":
        run_tasks(options)
    else:
        run_perplexity(options)


def load_model(options):
    """The checkpoint named by --model/--subfolder on --device in --dtype."""
    from modeling_mlra.cli import resolve_device_and_dtype
    from modeling_mlra.modeling_mlra import MLRAForCausalLM

    device, dtype = resolve_device_and_dtype(options.device, options.dtype)
    with reported_as(f"--model {options.model}"):
        model = MLRAForCausalLM.from_pretrained(options.model, subfolder=options.subfolder, dtype=dtype)
    model = model.to(device).eval()
    print(f"{options.model} {options.subfolder}".strip() + f": {model.config.variant or 'family model'}, "
          f"{model.num_parameters():,} parameters on {device} in {str(dtype).removeprefix('torch.')}")
    return model


def check_tokenizer_fits(options, tokenizer, model) -> None:
    """Every id the tokenizer produces must index the model's embedding (as `mlra generate` checks)."""
    name = f"--tokenizer {options.tokenizer}" if options.tokenizer else f"the tokenizer of --model {options.model}"
    check_vocabulary_fits(name, len(tokenizer), model.config.vocab_size)


def model_label(options) -> str:
    return str(Path(options.model, options.subfolder).name)


def write_json(path: Path, data: dict, default=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=default) + "\n")
    print(f"results written to {path}")


def run_perplexity(options) -> None:
    """`mlra eval ppl`: every file checked before any is evaluated, then one result per file and the table."""
    from modeling_mlra.cli import load_tokenizer

    from .perplexity import evaluate_perplexity, load_eval_tokens, num_batches
    from .tables import perplexity_table

    check_files("--data", options.data)
    check_at_least("--block-size", options.block_size, 1)
    check_at_least("--max-tokens", options.max_tokens, 1)
    names = [path.name for path in options.data]
    if len(set(names)) != len(names):
        raise CommandLineError(f"--data: several files share a name ({', '.join(names)}); results are keyed by name")
    model = load_model(options)
    needs_tokenizer = any(path.suffix != ".bin" for path in options.data)
    tokenizer = load_tokenizer(options.model, options.subfolder, options.tokenizer) if needs_tokenizer else None
    if tokenizer is not None:
        check_tokenizer_fits(options, tokenizer, model)
    tokens = {}
    for path in options.data:
        with reported_as(f"--data {path}"):
            tokens[path.name] = load_eval_tokens(path, model.config.vocab_size, tokenizer)
            num_batches(len(tokens[path.name]), options.block_size, options.batch_size, options.max_tokens, str(path))
    results = {}
    for path in options.data:
        start = time.perf_counter()
        result = evaluate_perplexity(
            model,
            tokens[path.name],
            block_size=options.block_size,
            batch_size=options.batch_size,
            max_tokens=options.max_tokens,
            progress=not options.no_progress,
            description=path.name,
        )
        results[path.name] = result.to_dict()
        print(
            f"{path.name}: loss {result.loss:.4f}, perplexity {result.perplexity:.3f}, {result.batches} batches of "
            f"{options.batch_size} x {options.block_size} ({time.perf_counter() - start:.1f} s)"
        )
    print(perplexity_table(results, model_label(options), model.config.variant))
    if options.output_json:
        write_json(options.output_json, results)


def task_manager_for(task_names: list[str], include_path: str | None):
    """lm-eval's TaskManager; the built-in tasks are indexed (tens of seconds) only when --include-path does not
    hold every requested task."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise CommandLineError(f"--include-path {include_path}: the folder does not exist")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_tasks for name in task_names):
            return local
    return TaskManager(include_path=include_path)


def run_tasks(options) -> None:
    """`mlra eval tasks`: lm-eval's simple_evaluate on the `mlra` model, lm-eval's table, and for `paper` the
    paper's Table 4 layout beside the authors' row."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    from modeling_mlra.cli import load_tokenizer

    from .lm_eval_model import MLRALM
    from .paper_results import load_paper_results
    from .tables import zero_shot_table

    paper = options.tasks == "paper"
    if paper:
        task_names = load_paper_results()["zero_shot"]["tasks"]
    else:
        task_names = [name.strip() for name in options.tasks.split(",") if name.strip()]
    task_manager = task_manager_for(task_names, options.include_path)
    unknown = [name for name in task_names if name not in task_manager.all_tasks]
    if unknown:
        raise CommandLineError(f"--tasks: unknown lm-eval task(s) {', '.join(unknown)} (see `lm_eval ls tasks`)")
    model = load_model(options)
    tokenizer = load_tokenizer(options.model, options.subfolder, options.tokenizer)
    check_tokenizer_fits(options, tokenizer, model)
    lm = MLRALM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=task_names,
        num_fewshot=0 if paper and options.num_fewshot is None else options.num_fewshot,
        limit=options.limit,
        task_manager=task_manager,
        log_samples=options.log_samples,
    )
    print(make_table(results))
    if paper:
        print(zero_shot_table(results, model_label(options), model.config.variant))
    print(f"{len(task_names)} task(s) in {time.perf_counter() - start:.1f} s")
    if options.output_json:
        write_json(options.output_json, results, default=handle_non_serializable)
