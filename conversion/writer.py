"""Writing a converted model folder: sharded safetensors, config.json with auto_map, the modeling files,
generation_config.json, the tokenizer and README.md, into a temporary folder renamed at the end."""

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.dynamic_module_utils import custom_object_save

from modeling_mlra import MLRAConfig, MLRAForCausalLM

DEFAULT_MAX_SHARD_SIZE = "5GB"


class ConversionError(ValueError):
    """Bad input to a conversion: the message names the file, key, shape or argument."""


def check_output_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ConversionError(f"output folder {out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output path {out} exists and is not a folder")


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
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _write_weights(partial, config, tensors, dtype, max_shard_size)
        _write_config_and_code(partial, config, dtype, generation_config)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        (partial / "README.md").write_text(readme, encoding="utf-8")
        _apply_umask(partial)
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


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
        waiting[filename].discard(key)
        if not waiting[filename]:
            save_file(pending.pop(filename), folder / filename, metadata={"format": "pt"})
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
