"""The `mlra` command line: `mlra generate` (demo, on the embedded tiny model by default), `mlra train`,
`mlra convert`, `mlra eval tasks|ppl`, `mlra verify` and `mlra serve` (transformers' server, continuous batching).

    mlra generate --prompt "def fibonacci(n):"
    mlra train --variant mlra_4 --hidden-size 256 ... --train-data a.txt --tokenizer tok/ --output-dir out/ --max-steps 1000
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, TextStreamer, set_seed

from .arguments import (
    CommandLineError,
    check_at_least,
    check_model_location,
    check_text,
    check_vocabulary_fits,
    reported_as,
)
from .modeling_mlra import MLRAForCausalLM
from .training import add_train_arguments, run_training

DEFAULT_MODEL = Path(__file__).parent / "default_model"
# Every `mlra` subcommand takes the same --device and --dtype names.
DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device (auto: cuda when available, else cpu) and --dtype (auto: bfloat16 on GPU, float32 on CPU)."""
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1...")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", *DTYPE_NAMES),
        help="auto: bfloat16 on GPU, float32 on CPU",
    )


def resolve_device_and_dtype(device: str, dtype: str) -> tuple[str, torch.dtype]:
    """The --device and --dtype options as a device name and a torch dtype; an unknown or absent device raises
    CommandLineError."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise CommandLineError(f"--device {device}: {error}") from None
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise CommandLineError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dtype == "auto":
        return device, torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, DTYPE_NAMES[dtype]


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help="local folder or Hub repo id (our format or the authors' checkpoints, e.g. Soughing/MLRA with "
        "--subfolder main/mlra_4); default: the tiny MLRA-4 embedded in this package, trained on Python code",
    )
    parser.add_argument("--subfolder", default="", help="folder inside --model holding the checkpoint")
    parser.add_argument(
        "--tokenizer",
        help="tokenizer folder or Hub id (default: the one saved with the model; the authors' checkpoints have "
        "none, and then the GPT-2 tokenizer is used if it is in the local Hugging Face cache)",
    )
    parser.add_argument("--prompt", default="def fibonacci(n):")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True,
        help="on CUDA, decode on a static cache with the compiled decode step (the first call compiles it)",
    )  # fmt: skip
    add_device_arguments(parser)


def load_tokenizer(model: str, subfolder: str, tokenizer: str | None):
    """The tokenizer named by --tokenizer, else the model's own, else GPT-2's from the local cache (the authors'
    checkpoints were trained on the GPT-2 vocabulary but ship no tokenizer)."""
    if tokenizer is not None:
        with reported_as(f"--tokenizer {tokenizer}"):
            return AutoTokenizer.from_pretrained(tokenizer)
    try:
        own = AutoTokenizer.from_pretrained(model, subfolder=subfolder)
        # Without tokenizer files AutoTokenizer still builds one from config.json's model_type, holding only
        # special tokens (the authors' folders say "gpt2").
        if len(own) <= len(own.all_special_tokens):
            raise OSError("the folder holds no tokenizer files")
        return own
    except (OSError, ValueError):
        try:
            return AutoTokenizer.from_pretrained("openai-community/gpt2", local_files_only=True)
        except OSError:
            raise CommandLineError(
                f"--model {model}{f' --subfolder {subfolder}' if subfolder else ''} has no tokenizer and the GPT-2 "
                "tokenizer is not in the local Hugging Face cache: pass --tokenizer (e.g. openai-community/gpt2)"
            ) from None


def check_generate_options(options) -> None:
    """The values of `mlra generate`'s options that no model could use."""
    check_model_location("--model", options.model, options.subfolder)
    if options.tokenizer is not None:
        check_model_location("--tokenizer", options.tokenizer)
    check_text("--prompt", options.prompt)
    check_at_least("--max-new-tokens", options.max_new_tokens, 1)
    if not 0 <= options.seed < 2**32:
        raise CommandLineError(f"--seed {options.seed}: must be in [0, 2**32) (numpy's and torch's seed range)")
    check_at_least("--top-k", options.top_k, 0)
    if options.temperature <= 0:
        raise CommandLineError(f"--temperature {options.temperature}: must be above 0")
    if not 0 < options.top_p <= 1:
        raise CommandLineError(f"--top-p {options.top_p}: must be in (0, 1]")


def check_prompt_fits(num_prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    """The prompt and the new tokens must fit in the context the model was trained for."""
    if num_prompt_tokens == 0:
        raise CommandLineError("--prompt is empty: give at least one token of text")
    if num_prompt_tokens + max_new_tokens > context:
        raise CommandLineError(
            f"--prompt ({num_prompt_tokens} tokens) and --max-new-tokens {max_new_tokens} exceed the model's context "
            f"of {context} tokens (max_position_embeddings): shorten the prompt or lower --max-new-tokens"
        )


def decoding_options(device: str, compile: bool) -> dict:
    """generate()'s cache options: on CUDA, a static cache, on which generate() compiles the decode step
    (MLRAForCausalLM._default_compile_config; split over GPUs under torchrun, every rank replays the same compiled
    step, its all-reduces inside); elsewhere, or with --no-compile, the growing cache, eager."""
    if compile and device.startswith("cuda"):
        return dict(cache_implementation="static")
    return {}


def generate(options) -> None:
    """The `mlra generate` command: stream a continuation of the prompt, then report the decoding speed."""
    check_generate_options(options)
    device, dtype = resolve_device_and_dtype(options.device, options.dtype)
    tokenizer = load_tokenizer(options.model, options.subfolder, options.tokenizer)
    # under torchrun the model is split over the processes (tensor parallelism) and only rank 0 prints
    tensor_parallel = {"tp_plan": "auto"} if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}
    with reported_as(f"--model {options.model}"):
        model = MLRAForCausalLM.from_pretrained(
            options.model, subfolder=options.subfolder, dtype=dtype, **tensor_parallel
        )
    if tensor_parallel:
        device = str(model.device)
    check_vocabulary_fits(
        f"--tokenizer {options.tokenizer}" if options.tokenizer else f"the tokenizer of --model {options.model}",
        len(tokenizer),
        model.config.vocab_size,
    )
    inputs = tokenizer(options.prompt, return_tensors="pt")
    check_prompt_fits(inputs["input_ids"].shape[1], options.max_new_tokens, model.config.max_position_embeddings)
    model.to(device).eval()
    inputs = inputs.to(device)
    set_seed(options.seed)
    printing = not tensor_parallel or model.tensor_parallel.rank == 0

    streamer = TextStreamer(tokenizer) if printing else None
    sampling = dict(temperature=options.temperature, top_k=options.top_k, top_p=options.top_p)
    start = time.perf_counter()
    output = model.generate(
        **inputs,
        max_new_tokens=options.max_new_tokens,
        do_sample=options.do_sample,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **(sampling if options.do_sample else {}),
        **decoding_options(device, options.compile),
    )
    elapsed = time.perf_counter() - start
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    if printing:
        print(f"\n[{new_tokens} tokens in {elapsed:.2f} s: {new_tokens / elapsed:.1f} tokens/s on {device}, {str(dtype).removeprefix('torch.')}]")


def verify_folder(folder: Path) -> None:
    """The `mlra verify` command: one line per problem on stderr and exit code 1, or a summary."""
    from .conversion.verify import verify_model_folder

    if not folder.is_dir():
        raise CommandLineError(f"{folder}: the folder does not exist")
    problems, summary = verify_model_folder(folder)
    for problem in problems:
        print(f"mlra verify: {problem}", file=sys.stderr)
    if problems:
        raise SystemExit(1)
    print(summary)


def serve(model: str, server_arguments: list[str]) -> None:
    """`transformers serve MODEL --continuous-batching --trust-remote-code ...`, with the MLRA classes findable.

    transformers' server (5.17 to 5.24) picks the model class as `getattr(transformers, config.architectures[0])`,
    which finds only the classes shipped inside transformers: a `trust_remote_code` model fails to load there
    ("module transformers has no attribute MLRAForCausalLM"). Everything else is transformers' own: its OpenAI-style
    endpoints, its options (`--port`, `--device`, `--cb-num-blocks`, ...) and its continuous-batching manager,
    whose paged cache holds the latent (modeling_mlra/paged_cache.py).
    """
    import transformers
    from transformers.cli.transformers import main as transformers_main

    setattr(transformers, MLRAForCausalLM.__name__, MLRAForCausalLM)
    sys.argv = ["transformers", "serve", model, "--continuous-batching", "--trust-remote-code", *server_arguments]
    transformers_main()


def main(argv: list[str] | None = None) -> None:
    from .conversion.cli import add_convert_arguments, run_convert  # here: it imports DTYPE_NAMES from this module
    from .eval.cli import add_eval_arguments, run_eval

    parser = argparse.ArgumentParser(prog="mlra", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_arguments(
        commands.add_parser("generate", help="continue a prompt, streaming tokens (default: the embedded tiny model)")
    )
    add_train_arguments(
        commands.add_parser("train", help="train a family member from scratch or from a checkpoint (Trainer)")
    )
    add_convert_arguments(commands.add_parser("convert", help="convert checkpoints: the authors' format, MLA models"))
    add_eval_arguments(commands.add_parser("eval", help="lm-eval tasks and the authors' perplexity protocol"))
    verify = commands.add_parser("verify", help="check a model folder: files against SHA256SUMS, weights finite")
    verify.add_argument("folder", type=Path)
    serve_parser = commands.add_parser(
        "serve",
        help="transformers serve with continuous batching on the latent pages; other options go to it (--port, ...)",
    )
    serve_parser.add_argument("model", nargs="?", default=str(DEFAULT_MODEL), help="local folder or Hub repo id")
    options, server_arguments = parser.parse_known_args(argv)
    if server_arguments and options.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(server_arguments)}")
    try:
        if options.command == "serve":
            serve(options.model, server_arguments)
        elif options.command == "generate":
            generate(options)
        elif options.command == "convert":
            run_convert(options)
        elif options.command == "eval":
            run_eval(options)
        elif options.command == "verify":
            verify_folder(options.folder)
        else:
            run_training(options)
    except CommandLineError as error:
        message = " ".join(str(error).split())  # one line, whatever the loader's message looked like
        print(f"mlra {options.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
