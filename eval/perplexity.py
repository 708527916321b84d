"""Perplexity with the authors' protocol (their `eval_ppl.py`), on their `.bin` evaluation files or on text.

The protocol: consecutive blocks of `block_size` tokens starting at the first token, each block's targets the same
tokens shifted by one; the blocks are grouped into whole batches of `batch_size`, and only
`min(max_tokens, num_tokens) // (batch_size * block_size)` batches are evaluated. The loss is the mean over batches
of each batch's mean cross-entropy, and the perplexity is its exponential.
"""

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from modeling_mlra.data import load_tokens

# The authors' default: 1e8 tokens per evaluation file.
DEFAULT_MAX_TOKENS = 100_000_000


@dataclass
class PerplexityResult:
    loss: float
    perplexity: float
    batches: int

    def to_dict(self) -> dict:
        return asdict(self)


def num_batches(
    num_tokens: int, block_size: int, batch_size: int, max_tokens: int = DEFAULT_MAX_TOKENS, name: str = "the data"
) -> int:
    """How many whole batches of `batch_size` blocks of `block_size` tokens the protocol evaluates in `num_tokens`
    tokens (at least one, else a ValueError naming the data)."""
    batches = min(max_tokens, num_tokens) // (batch_size * block_size)
    if batches == 0:
        raise ValueError(
            f"{name}: {min(num_tokens, max_tokens)} tokens are fewer than one batch of {batch_size} x {block_size} "
            "(+1 target); lower the batch size or the block size"
        )
    return batches


def block_starts(num_tokens: int, block_size: int, num_blocks: int) -> Iterator[int]:
    """Start offsets of the protocol's `num_blocks` blocks: consecutive from the first token. As in the authors' loop,
    a block whose last target would lie past the end restarts at the first token; that happens only to the very
    last block, when the blocks fill the file exactly."""
    offset = 0
    for _ in range(num_blocks):
        if offset + block_size + 1 > num_tokens:
            offset = 0
        yield offset
        offset += block_size


def load_eval_tokens(path: str | Path, vocab_size: int, tokenizer=None) -> np.ndarray:
    """Tokens [n] of one evaluation file (`.bin` in the authors' format, `.jsonl` or plain text through
    `tokenizer`), checked against the model's vocabulary."""
    tokens = load_tokens([path], tokenizer)
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise ValueError(
            f"{path}: token id {int(tokens.max())} is out of range for the model's vocabulary of {vocab_size} "
            "(was the file tokenized with another tokenizer?)"
        )
    return tokens


@torch.no_grad()
def evaluate_perplexity(
    model,
    tokens: np.ndarray,
    block_size: int = 2048,
    batch_size: int = 16,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: bool = True,
    description: str | None = None,
) -> PerplexityResult:
    """Loss and perplexity of `model` on `tokens` [n] with the authors' protocol (module docstring). The
    cross-entropy is computed in float32 whatever the model's dtype, one sequence at a time to bound the memory of
    the float32 logits."""
    batches = num_batches(len(tokens), block_size, batch_size, max_tokens, description or "the data")
    model.eval()
    device = next(model.parameters()).device
    starts = list(block_starts(len(tokens), block_size, batches * batch_size))
    losses = []
    for batch in tqdm(range(batches), desc=description, disable=not progress):
        batch_starts = starts[batch * batch_size : (batch + 1) * batch_size]
        # Each row holds a block and one more token: inputs are row[:-1], targets row[1:].
        rows = np.stack([np.asarray(tokens[start : start + block_size + 1], dtype=np.int64) for start in batch_starts])
        rows = torch.from_numpy(rows).to(device)
        logits = model(input_ids=rows[:, :-1], use_cache=False).logits
        total = sum(
            F.cross_entropy(sequence_logits.float(), targets, reduction="sum")
            for sequence_logits, targets in zip(logits, rows[:, 1:])
        )
        losses.append(total.item() / (batch_size * block_size))
    loss = sum(losses) / len(losses)
    return PerplexityResult(loss=loss, perplexity=math.exp(loss), batches=batches)
