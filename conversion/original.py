"""`mlra convert original`: an authors' checkpoint (nanoGPT format, e.g. Hub repo `Soughing/MLRA`) into a folder
that plain transformers loads with `trust_remote_code=True`."""

import os
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils import cached_file, logging

from modeling_mlra.original_checkpoint import converted_tensors, find_original_checkpoint, open_original_checkpoint

from .hub_card import CardInfo, render_hub_card
from .writer import ConversionError, check_output_folder, planned_tensors, write_model_folder

logger = logging.get_logger(__name__)
GPT2_TOKENIZER = "openai-community/gpt2"


def describe_source(src: str, subfolder: str) -> str:
    return f"{src} (subfolder {subfolder})" if subfolder else src


def missing_config_error(src: str, subfolder: str) -> ConversionError:
    where = describe_source(src, subfolder)
    if os.path.isdir(src):
        return ConversionError(f"{os.path.join(src, subfolder, 'config.json')}: no such file")
    offline = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return ConversionError(f"{where}: no config.json, neither a local folder nor a reachable Hub repo{offline}")


def check_source(src: str, subfolder: str) -> None:
    """A local path that does not exist is an error here (a Hub id has the form `namespace/name`)."""
    looks_local = os.path.isabs(src) or src.startswith(".") or src.count("/") > 1
    if looks_local and not os.path.isdir(src):
        raise ConversionError(f"{os.path.join(src, subfolder, 'config.json')}: no such file (no folder {src})")


def find_tokenizer(src: str, subfolder: str, tokenizer: str | None, fallback: str | None = GPT2_TOKENIZER):
    """--tokenizer when given; else one saved in SRC; else `fallback` from the local Hugging Face cache (GPT-2's:
    the published models use it but ship none); else None, with a warning."""
    if tokenizer is not None:
        try:
            return AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as error:
            raise ConversionError(f"--tokenizer {tokenizer}: cannot load a tokenizer ({error})") from error
    candidates = [(fallback, dict(local_files_only=True))] if fallback else []
    has_own = any(
        cached_file(src, name, subfolder=subfolder, _raise_exceptions_for_missing_entries=False,
                    _raise_exceptions_for_connection_errors=False)
        for name in ("tokenizer.json", "tokenizer_config.json")
    )
    if has_own:
        candidates.insert(0, (src, dict(subfolder=subfolder)))
    for location, kwargs in candidates:
        try:
            found = AutoTokenizer.from_pretrained(location, **kwargs)
        except (OSError, ValueError):
            continue
        # without tokenizer files AutoTokenizer may still build one holding only special tokens
        if len(found) > len(found.all_special_tokens):
            return found
    logger.warning(f"no tokenizer found in {describe_source(src, subfolder)} (nor {fallback} in the cache): none written")
    return None


def convert_original(
    src: str,
    out: Path,
    subfolder: str = "",
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer: str | None = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    repo_id: str | None = None,
) -> Path:
    """Convert the authors' checkpoint at `src` (local folder or Hub repo, `subfolder` inside it) into `out`."""
    check_output_folder(Path(out), overwrite)
    check_source(src, subfolder)
    hub_kwargs = dict(subfolder=subfolder) if subfolder else {}
    checkpoint = find_original_checkpoint(src, **hub_kwargs)
    if checkpoint is None:
        config_file = Path(src, subfolder, "config.json")
        if config_file.is_file():
            raise ConversionError(f"{config_file}: not the authors' format (model_type 'gpt2' with nanoGPT fields)")
        raise missing_config_error(src, subfolder)
    config, tensors = open_original_checkpoint(checkpoint, variant)
    config.dtype = dtype
    found_tokenizer = find_tokenizer(src, subfolder, tokenizer)
    expected_shapes = {key: tuple(t.shape) for key, t in planned_tensors(config, dtype).items()}
    expected_shapes["lm_head.weight"] = expected_shapes["model.embed_tokens.weight"]
    local = os.path.isdir(src)
    info = CardInfo(
        repo_id=repo_id or str(out),
        provenance=(
            f"Converted with `mlra convert original` from the authors' checkpoint "
            f"`{describe_source(src if not local else Path(src).name, subfolder)}` ({config.variant}); the float32 "
            "conversion reproduces the authors' own forward pass to 1e-4 on their reference fixtures."
        ),
        tokenizer_id=(repo_id or str(out)) if found_tokenizer is not None else GPT2_TOKENIZER,
        base_model=None if local else src,
        limitations=[
            "The `*_no_scale` ablations cannot be told from their weights: the variant came from `--variant`, "
            "else the folder name, else the weight shapes (then the scaled form).",
        ],
    )
    return write_model_folder(
        out,
        config,
        converted_tensors(tensors, config, dtype, expected_shapes),
        dtype=dtype,
        readme=render_hub_card(config, info),
        tokenizer=found_tokenizer,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
    )
