"""Writing a converted model folder: sharded safetensors, config.json with auto_map, the modeling files,
generation_config.json, the tokenizer, README.md and SHA256SUMS, into a temporary folder moved to OUT at the end.

What a run leaves is OUT complete, or nothing, and it never removes what it did not create:

- the temporary folder `.OUT.xxxxxxxx.partial` (beside OUT, so the final move stays on one filesystem) is locked
  (flock) for the run's lifetime; the kernel drops the lock when the process dies, even by SIGKILL, so the next run
  into OUT removes partial folders nobody holds, and refuses to start while another run holds one;
- SIGTERM and SIGHUP unwind like Ctrl-C (when no other handler is installed): the partial folder is removed;
- the final move is one `renameat2` call: RENAME_NOREPLACE, which fails if OUT appeared meanwhile (a plain rename
  would replace an empty folder), or with `overwrite` RENAME_EXCHANGE, which swaps the new folder with the old one,
  removed only once the new one is in place. Where renameat2 is missing (not Linux, some network filesystems)
  OUT is checked just before a plain rename, and the old OUT is renamed aside until the new one is in place.
"""

import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import logging

from modeling_mlra import MLRAConfig, MLRAForCausalLM
from modeling_mlra.original_checkpoint import check_finite

logger = logging.get_logger(__name__)
DEFAULT_MAX_SHARD_SIZE = "5GB"
CHECKSUMS_FILE = "SHA256SUMS"  # `sha256sum -c SHA256SUMS` checks the folder; so does `mlra verify`
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2  # <linux/fs.h>
AT_FDCWD = -100


class ConversionError(ValueError):
    """Bad input to a conversion: the message names the file, key, shape or argument."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a conversion, raised like Ctrl-C's KeyboardInterrupt so that everything unwinds."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def check_output_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ConversionError(f"output folder {out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output path {out} exists and is not a folder")


def check_shard_size(max_shard_size: int | str) -> None:
    """`max_shard_size` as huggingface_hub reads it: bytes, or a string such as "5GB" or "500MB"."""
    if isinstance(max_shard_size, int):
        return
    try:
        parse_size_to_int(max_shard_size)
    except ValueError:
        raise ConversionError(f"--max-shard-size {max_shard_size}: not a size such as 5GB, 500MB or 100KB") from None


def planned_tensors(config: MLRAConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Meta tensors (no memory) with the name, shape and dtype of every tensor the folder will hold: the model's
    state dict without the lm_head when it is tied to the embedding."""
    with torch.device("meta"):
        model = MLRAForCausalLM(config)
    skipped = {"lm_head.weight"} if config.tie_word_embeddings else set()
    return {key: tensor.to(dtype) for key, tensor in model.state_dict().items() if key not in skipped}


def write_model_folder(
    out: Path,
    config: MLRAConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    readme: str,
    tokenizer=None,
    generation_config: GenerationConfig | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write a loadable model folder at `out` from `tensors`, (our key, tensor) pairs consumed one at a time.

    A shard is written as soon as all of its tensors have arrived, then released, so memory holds one shard of
    converted tensors (plus whatever the source keeps mapped). Everything goes into a temporary folder beside
    `out`, renamed to `out` at the end: a failure leaves nothing behind (and an existing `out` untouched).
    """
    out = Path(out)
    check_output_folder(out, overwrite)
    check_shard_size(max_shard_size)
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ConversionError(
            f"the tokenizer {tokenizer.name_or_path} has {len(tokenizer)} tokens but the model's vocabulary holds "
            f"{config.vocab_size} (config.vocab_size): use the tokenizer the model was trained with"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with _terminate_as_interrupt(), _partial_folder(out) as partial:
        try:
            _write_weights(partial, config, tensors, dtype, max_shard_size)
            _write_config_and_code(partial, config, dtype, generation_config)
            if tokenizer is not None:
                tokenizer.save_pretrained(partial)
            (partial / "README.md").write_text(readme, encoding="utf-8")
            _write_checksums(partial)
        except OSError as error:
            if error.errno is not None and error.filename is None:  # a failed write() names no file (a full disk)
                raise OSError(error.errno, f"{error.strerror} (writing {out})") from error
            raise
        _apply_umask(partial)
        _publish(partial, out, overwrite)
    return out


def partial_folders(out: Path) -> list[Path]:
    """The temporary folders of runs into `out` (mkdtemp's names: 8 random characters)."""
    return sorted(out.parent.glob(f".{glob.escape(out.name)}.{'?' * 8}.partial"))


@contextmanager
def _partial_folder(out: Path) -> Iterator[Path]:
    """This run's temporary folder beside `out`, locked while it lives and removed unless it was moved to `out`.
    Claiming it first removes the partial folders of dead runs into `out` and refuses while a live one writes."""
    parent = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(parent, fcntl.LOCK_EX)  # claims and sweeps of one folder happen one at a time
        for stale in partial_folders(out):
            with _locked(stale, blocking=False) as free:
                if not free:
                    raise ConversionError(f"another conversion is writing {out} now (its temporary folder {stale} is in use)")
                logger.warning(f"removing {stale}, left by a conversion into {out} that was killed")
                shutil.rmtree(stale, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        lock = os.open(partial, os.O_RDONLY)
        fcntl.flock(lock, fcntl.LOCK_EX)
    finally:
        os.close(parent)
    try:
        yield partial
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already once published; the old OUT once swapped
        os.close(lock)


@contextmanager
def _locked(folder: Path, blocking: bool) -> Iterator[bool]:
    """flock on `folder`; yields whether it was obtained."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (kill, a scheduler's time limit, a closed terminal) raise `Terminated`, a
    KeyboardInterrupt as Ctrl-C's, so the temporary folder is removed; only where the signal still has its default action."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise Terminated(signum)

    replaced = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(sig) is signal.SIG_DFL}
    try:
        yield
    finally:
        for sig, previous in replaced.items():
            signal.signal(sig, previous)


def renameat2(source: Path, target: Path, flags: int) -> None:
    """Linux's renameat2(2); OSError(ENOSYS) where the C library lacks it."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", str(source))
    if function(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(target), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(source), None, str(target))


def _publish(partial: Path, out: Path, overwrite: bool) -> None:
    """Move the finished `partial` to `out` in one step; with `overwrite` an existing `out` ends up at `partial`
    (removed by the caller), otherwise an `out` that appeared meanwhile stays and this run fails."""
    try:
        if overwrite:
            try:
                renameat2(partial, out, RENAME_EXCHANGE)
                return
            except FileNotFoundError:  # no OUT (any more): nothing to swap with
                pass
        renameat2(partial, out, RENAME_NOREPLACE)
    except FileExistsError:
        raise ConversionError(
            f"output folder {out} appeared while converting; it was left as it is (pass --overwrite to replace it)"
        ) from None
    except OSError as error:
        if error.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
        _publish_without_renameat2(partial, out, overwrite)


def _publish_without_renameat2(partial: Path, out: Path, overwrite: bool) -> None:
    """The same with plain renames: OUT is checked just before the move, and an old OUT is renamed aside (next to
    it, as `.OUT.xxxxxxxx.old`) until the new one is in place."""
    if not out.exists():
        os.rename(partial, out)
        return
    if not overwrite:
        raise ConversionError(f"output folder {out} appeared while converting; it was left as it is (pass --overwrite to replace it)")
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, aside / out.name)
    try:
        os.rename(partial, out)
    except BaseException:
        os.rename(aside / out.name, out)
        aside.rmdir()
        raise
    os.rename(aside / out.name, partial)  # removed with the partial folder
    aside.rmdir()


def _write_checksums(folder: Path) -> None:
    """SHA256SUMS in sha256sum's format: every file of the folder, so that `sha256sum -c SHA256SUMS` or
    `mlra verify` finds a corrupted copy later (about 0.5 GB/s of hashing; benchmarks/results/weight_checks.md)."""
    lines = [f"{file_sha256(path)}  {path.name}\n" for path in sorted(folder.iterdir()) if path.is_file()]
    (folder / CHECKSUMS_FILE).write_text("".join(lines), encoding="utf-8")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _apply_umask(folder: Path) -> None:
    """Give the folder and its files the permissions of a plainly created folder (mkdtemp makes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _write_weights(folder: Path, config: MLRAConfig, tensors, dtype: torch.dtype, max_shard_size) -> None:
    plan = planned_tensors(config, dtype)
    split = split_torch_state_dict_into_shards(
        plan, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    waiting = {filename: set(keys) for filename, keys in split.filename_to_tensors.items()}
    pending: dict[str, dict[str, torch.Tensor]] = {filename: {} for filename in waiting}
    for key, tensor in tqdm(tensors, total=len(plan), desc="converting", unit="tensor"):
        if key not in plan:
            raise ConversionError(f"the conversion produced {key!r}, which {MLRAForCausalLM.__name__} has no place for")
        if tuple(tensor.shape) != tuple(plan[key].shape):
            raise ConversionError(f"{key}: shape {tuple(tensor.shape)}, but the model needs {tuple(plan[key].shape)}")
        filename = split.tensor_to_filename[key]
        pending[filename][key] = tensor.to(dtype).contiguous()
        check_finite(pending[filename][key], f"the converted tensor {key} ({str(dtype).removeprefix('torch.')})")
        waiting[filename].discard(key)
        if not waiting[filename]:
            try:
                save_file(pending.pop(filename), folder / filename, metadata={"format": "pt"})
            except SafetensorError as error:  # e.g. a full disk
                raise OSError(f"{folder / filename}: cannot write the shard ({error})") from error
    missing = sorted(key for keys in waiting.values() for key in keys)
    if missing:
        raise ConversionError(f"the conversion produced no {missing[0]!r} ({len(missing)} tensors missing)")
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_config_and_code(folder: Path, config: MLRAConfig, dtype: torch.dtype, generation_config) -> None:
    """config.json (with auto_map) and the modeling files, through the same mechanism as `save_pretrained`
    (`custom_object_save` copies the model's module and every module it imports relatively)."""
    config.architectures = [MLRAForCausalLM.__name__]
    config.dtype = str(dtype).removeprefix("torch.")
    with torch.device("meta"):
        model = MLRAForCausalLM(config)
    custom_object_save(model, folder, config=config)
    config.save_pretrained(folder)
    (generation_config or GenerationConfig.from_model_config(config)).save_pretrained(folder)
