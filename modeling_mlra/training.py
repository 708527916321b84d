"""Training any member of the MLRA family with the transformers Trainer, using the paper's recipe by default.

Recipe (paper): AdamW with betas (0.9, 0.95) and weight decay 0.1 (not on norms), gradient clipping at 1.0, linear
warmup then cosine decay to 10% of the peak learning rate, output projections initialised at zero (done by
`MLRAPreTrainedModel._init_weights`), bf16 autocast on GPU and float32 on CPU.
"""

import math
from pathlib import Path

import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .arguments import (
    CommandLineError,
    check_at_least,
    check_files,
    check_model_location,
    check_vocabulary_fits,
    reported_as,
)
from .configuration_mlra import MLRAConfig
from .data import TokenBlockDataset, load_tokens
from .modeling_mlra import MLRAForCausalLM

logger = logging.get_logger(__name__)


def build_model(
    variant: str | None = None, init_from: str | None = None, seed: int = 0, **config_overrides
) -> MLRAForCausalLM:
    """A model to train: the weights of `init_from` (our format or the authors'), or a fresh `variant` with the
    published dimensions replaced by `config_overrides` (e.g. `hidden_size=256`), initialised with `seed`."""
    if (variant is None) == (init_from is None):
        raise ValueError("give exactly one of variant (train from scratch) and init_from (continue from weights)")
    if init_from is not None:
        return MLRAForCausalLM.from_pretrained(init_from, dtype=torch.float32)
    config = MLRAConfig.from_variant(variant, **config_overrides)
    torch.manual_seed(seed)
    return MLRAForCausalLM(config)


def training_arguments(
    output_dir: str | Path,
    max_steps: int,
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    learning_rate: float = 1e-3,
    warmup_steps: int = 100,
    min_lr_rate: float = 0.1,
    weight_decay: float = 0.1,
    max_grad_norm: float = 1.0,
    logging_steps: int = 10,
    eval_steps: int | None = None,
    save_steps: int = 500,
    seed: int = 0,
    **overrides,
) -> TrainingArguments:
    """TrainingArguments with the paper's optimiser and schedule; `overrides` are passed on unchanged."""
    arguments = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=learning_rate,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": min_lr_rate},
        warmup_steps=warmup_steps,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        logging_steps=logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to="none",
    )
    arguments.update(overrides)
    return TrainingArguments(**arguments)


def last_checkpoint(output_dir: str | Path) -> str:
    """The last `checkpoint-*` folder the Trainer wrote in `output_dir`; FileNotFoundError naming it if none."""
    found = get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
    if found is None:
        raise FileNotFoundError(f"--resume: no checkpoint-* folder in output directory {output_dir}")
    return found


def train(
    model: MLRAForCausalLM,
    args: TrainingArguments,
    train_dataset: torch.utils.data.Dataset,
    eval_dataset: torch.utils.data.Dataset | None = None,
    tokenizer=None,
    resume: bool = False,
    callbacks: list | None = None,
) -> Trainer:
    """Train `model` on blocks of tokens (items `{"input_ids", "labels"}`); with `resume`, continue from the last
    checkpoint in `args.output_dir` (optimizer, scheduler, RNG and data order included). Returns the Trainer."""
    resume_from = None
    if resume:
        resume_from = last_checkpoint(args.output_dir)
        logger.warning(f"resuming from {resume_from}")
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


def load_datasets(
    train_files: list[str], eval_files: list[str] | None, tokenizer, block_size: int, vocab_size: int
) -> tuple[TokenBlockDataset, TokenBlockDataset | None]:
    """Blocks of `block_size` tokens from text files (tokenized with `tokenizer`) or `.bin` shards."""
    datasets = []
    for name, files in (("train", train_files), ("eval", eval_files)):
        if not files:
            datasets.append(None)
            continue
        tokens = load_tokens(files, tokenizer)
        if tokens.max() >= vocab_size:
            raise ValueError(
                f"{name} data holds token id {tokens.max()} but the model's vocab_size is {vocab_size}: "
                "use the tokenizer the data was made with, or a larger --vocab-size"
            )
        logger.warning(f"{name} data: {len(tokens):,} tokens from {len(files)} file(s)")
        datasets.append(TokenBlockDataset(tokens, block_size))
    return datasets[0], datasets[1]


def check_train_options(options) -> None:
    """The values of `mlra train`'s options that no model or data could use, checked before anything loads."""
    for option, value, minimum in (
        ("--max-steps", options.max_steps, 1),
        ("--batch-size", options.batch_size, 1),
        ("--gradient-accumulation-steps", options.gradient_accumulation_steps, 1),
        ("--block-size", options.block_size, 2),
        ("--warmup-steps", options.warmup_steps, 0),
        ("--logging-steps", options.logging_steps, 1),
        ("--eval-steps", options.eval_steps, 1),
        ("--save-steps", options.save_steps, 1),
    ):
        check_at_least(option, value, minimum)
    if options.learning_rate <= 0:
        raise CommandLineError(f"--learning-rate {options.learning_rate}: must be above 0")
    check_files("--train-data", options.train_data)
    check_files("--eval-data", options.eval_data or [])
    if options.init_from is not None:
        check_model_location("--init-from", options.init_from)
    if options.tokenizer is not None:
        check_model_location("--tokenizer", options.tokenizer)
    text_files = [f for f in options.train_data + (options.eval_data or []) if Path(f).suffix != ".bin"]
    if text_files and options.tokenizer is None and options.init_from is None:
        raise CommandLineError(
            f"--train-data/--eval-data {text_files[0]} is a text file: pass --tokenizer to tokenize it, or give "
            ".bin token shards"
        )
    if Path(options.output_dir).is_file():
        raise CommandLineError(f"--output-dir {options.output_dir} is a file, not a folder")
    if options.resume:
        with reported_as("--resume"):
            last_checkpoint(options.output_dir)


def run_training(options) -> Path:
    """The `mlra train` command: builds (or loads) the model, tokenizes the data, trains, and saves the final
    model and tokenizer to `options.output_dir`. Returns that folder. A bad argument raises CommandLineError
    before training starts."""
    check_train_options(options)
    text_data = any(Path(f).suffix != ".bin" for f in options.train_data + (options.eval_data or []))
    tokenizer_source = options.tokenizer or (options.init_from if text_data else None)
    tokenizer_option = f"{'--tokenizer' if options.tokenizer else '--init-from'} {tokenizer_source}"
    tokenizer = None
    if tokenizer_source:
        with reported_as(tokenizer_option):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    sizes = {
        field: value
        for field, value in (
            ("vocab_size", options.vocab_size),
            ("hidden_size", options.hidden_size),
            ("num_hidden_layers", options.num_layers),
            ("num_attention_heads", options.num_heads),
            ("intermediate_size", options.intermediate_size),
            ("q_lora_rank", options.q_lora_rank),
            ("kv_lora_rank", options.kv_lora_rank),
            ("qk_nope_head_dim", options.qk_nope_head_dim),
            ("qk_rope_head_dim", options.qk_rope_head_dim),
            ("v_head_dim", options.v_head_dim or options.qk_nope_head_dim),
        )
        if value is not None
    }
    if options.init_from is not None:
        if options.variant is not None or sizes:
            raise CommandLineError(
                "--init-from keeps the checkpoint's variant and sizes: drop --variant and the size options"
            )
        with reported_as(f"--init-from {options.init_from}"):
            model = build_model(init_from=options.init_from)
        if tokenizer is not None:
            check_vocabulary_fits(tokenizer_option, len(tokenizer), model.config.vocab_size)
    else:
        if tokenizer is not None:
            sizes.setdefault("vocab_size", len(tokenizer))
            check_vocabulary_fits(tokenizer_option, len(tokenizer), sizes["vocab_size"])
            special = ("bos_token_id", "eos_token_id", "pad_token_id")
            sizes.update({name: getattr(tokenizer, name) for name in special})
        if options.block_size is not None:
            sizes["max_position_embeddings"] = options.block_size
        with reported_as(f"--variant {options.variant or 'mlra_4'} with the given sizes"):
            model = build_model(variant=options.variant or "mlra_4", seed=options.seed, **sizes)
    config = model.config
    block_size = options.block_size or min(config.max_position_embeddings, 1024)
    with reported_as("--train-data/--eval-data"):
        train_dataset, eval_dataset = load_datasets(
            options.train_data, options.eval_data, tokenizer, block_size, config.vocab_size
        )
    logger.warning(
        f"training {config.variant or 'mlra'} with {model.num_parameters():,} parameters, block size {block_size}"
    )
    args = training_arguments(
        options.output_dir,
        max_steps=options.max_steps,
        batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        learning_rate=options.learning_rate,
        warmup_steps=options.warmup_steps,
        min_lr_rate=options.min_lr_rate,
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
        logging_steps=options.logging_steps,
        eval_steps=options.eval_steps if eval_dataset is not None else None,
        save_steps=options.save_steps,
        seed=options.seed,
        disable_tqdm=options.no_progress_bar,
    )
    trainer = train(model, args, train_dataset, eval_dataset, tokenizer, resume=options.resume)
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if evaluations:
        loss, step = evaluations[-1]["eval_loss"], evaluations[-1]["step"]
        logger.warning(f"eval loss at step {step}: {loss:.4f} (perplexity {math.exp(loss):.2f})")
    output_dir = Path(options.output_dir)
    trainer.model.config.use_cache = True  # the Trainer switches it off for training (TrainingArguments.use_cache)
    trainer.model.to(getattr(torch, options.save_dtype)).save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return output_dir


def add_train_arguments(parser) -> None:
    """The options of `mlra train` (argparse)."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--variant",
        help="family member to train from scratch (default mlra_4): mla, gla_2, gla_4, mlra_2, mlra_4, or one of "
        "these with _gated or _no_scale",
    )
    model.add_argument("--init-from", help="checkpoint folder (or Hub repo id) to start from instead of a fresh model")
    for flag in (
        "--vocab-size",
        "--hidden-size",
        "--num-layers",
        "--num-heads",
        "--intermediate-size",
        "--q-lora-rank",
        "--kv-lora-rank",
        "--qk-nope-head-dim",
        "--qk-rope-head-dim",
        "--v-head-dim",
    ):
        model.add_argument(flag, type=int, help="size override of the fresh model (default: published value)")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--train-data", nargs="+", required=True, help="text files (tokenized with --tokenizer) or authors' .bin shards"
    )
    data.add_argument("--eval-data", nargs="+", help="held-out files, same formats; evaluated every --eval-steps")
    data.add_argument(
        "--tokenizer",
        help="tokenizer folder or Hub id for text data (default: the --init-from one); saved with the model",
    )
    data.add_argument("--block-size", type=int, help="training context in tokens (default: min(max positions, 1024))")
    optim = parser.add_argument_group("optimisation (defaults: the paper's recipe)")
    optim.add_argument("--output-dir", required=True, help="checkpoints and the final model go here")
    optim.add_argument("--max-steps", type=int, required=True)
    optim.add_argument("--batch-size", type=int, default=8, help="sequences per device and step")
    optim.add_argument("--gradient-accumulation-steps", type=int, default=1)
    optim.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate")
    optim.add_argument("--warmup-steps", type=int, default=100)
    optim.add_argument("--min-lr-rate", type=float, default=0.1, help="final learning rate / peak (cosine decay)")
    optim.add_argument("--weight-decay", type=float, default=0.1)
    optim.add_argument("--max-grad-norm", type=float, default=1.0)
    optim.add_argument("--logging-steps", type=int, default=10)
    optim.add_argument("--eval-steps", type=int, default=500)
    optim.add_argument("--save-steps", type=int, default=500)
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    optim.add_argument(
        "--save-dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the final saved weights"
    )
    optim.add_argument("--no-progress-bar", action="store_true", help="log lines only (for log files)")


__all__ = ["add_train_arguments", "build_model", "run_training", "train", "training_arguments"]
