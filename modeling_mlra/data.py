"""Token data for training and evaluation: the authors' `.bin` shards, plain text and JSON Lines files.

The authors' format (nanoGPT / llm.c shards): a header of 256 int32 (magic 20240520, version 1, token count,
then zeros) followed by the tokens as uint16.
"""

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

BIN_MAGIC = 20240520
BIN_VERSION = 1
BIN_HEADER_INTS = 256


def read_bin_tokens(path: str | Path) -> np.ndarray:
    """Tokens [n] (uint16, memory-mapped) of one shard in the authors' `.bin` format."""
    path = Path(path)
    header = np.fromfile(path, dtype=np.int32, count=BIN_HEADER_INTS)
    if header.shape[0] < 3 or header[0] != BIN_MAGIC:
        raise ValueError(f"{path}: not a token shard (expected magic {BIN_MAGIC} in the first int32 of the header)")
    if header[1] != BIN_VERSION:
        raise ValueError(f"{path}: unsupported token shard version {header[1]} (expected {BIN_VERSION})")
    num_tokens = int(header[2])
    expected_bytes = BIN_HEADER_INTS * 4 + num_tokens * 2
    if path.stat().st_size != expected_bytes:
        raise ValueError(
            f"{path}: header announces {num_tokens} tokens ({expected_bytes} bytes) but the file has "
            f"{path.stat().st_size} bytes"
        )
    return np.memmap(path, dtype=np.uint16, mode="r", offset=BIN_HEADER_INTS * 4, shape=(num_tokens,))


def write_bin_tokens(path: str | Path, tokens: Sequence[int] | np.ndarray) -> None:
    """Write tokens [n] (each < 65536) as one shard in the authors' `.bin` format."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must fit in uint16 for the .bin format (got max {tokens.max()})")
    header = np.zeros(BIN_HEADER_INTS, dtype=np.int32)
    header[:3] = (BIN_MAGIC, BIN_VERSION, tokens.size)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())


def tokenize_texts(texts: Iterable[str], tokenizer) -> np.ndarray:
    """Concatenated tokens [n] of several documents, each followed by the tokenizer's eos token (if it has one)
    so that the model sees where documents end."""
    pieces = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        pieces.append(np.asarray(ids, dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def read_jsonl_texts(path: Path, key: str = "text") -> list[str]:
    """The `key` field of every line of a JSON Lines file, one document each."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise ValueError(f"{path}, line {number}: expected an object with a string field {key!r}")
            texts.append(record[key])
    return texts


def load_tokens(paths: Sequence[str | Path], tokenizer=None) -> np.ndarray:
    """Tokens [n] of several files, concatenated in order: `.bin` shards as stored, `.jsonl` files as one document
    per line (its "text" field), any other file as one UTF-8 document; text is tokenized with `tokenizer`. A single
    shard stays memory-mapped (uint16)."""
    if not paths:
        raise ValueError("no data files given")
    parts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        if path.suffix == ".bin":
            parts.append(read_bin_tokens(path))
        else:
            if tokenizer is None:
                raise ValueError(f"{path} is a text file: a tokenizer is needed to tokenize it")
            texts = read_jsonl_texts(path) if path.suffix == ".jsonl" else [path.read_text(encoding="utf-8")]
            parts.append(tokenize_texts(texts, tokenizer))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class TokenBlockDataset(torch.utils.data.Dataset):
    """Consecutive non-overlapping blocks of `block_size` tokens; each item is `{"input_ids", "labels"}` [block_size]
    with labels equal to input_ids (MLRAForCausalLM shifts them). A trailing partial block is dropped."""

    def __init__(self, tokens: np.ndarray, block_size: int):
        if len(tokens) < block_size:
            raise ValueError(f"{len(tokens)} tokens are fewer than one block of {block_size}")
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.tokens) // self.block_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.block_size
        block = torch.from_numpy(np.asarray(self.tokens[start : start + self.block_size], dtype=np.int64))
        return {"input_ids": block, "labels": block.clone()}
