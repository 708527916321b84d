"""`mlra convert original`: an authors' checkpoint (nanoGPT format, e.g. Hub repo `Soughing/MLRA`) into a folder
that plain transformers loads with `trust_remote_code=True`."""

import os
from pathlib import Path

import torch
from transformers.utils import logging

from modeling_mlra import VARIANTS
from modeling_mlra.original_checkpoint import converted_tensors, find_original_checkpoint, open_original_checkpoint

from .hub_card import CardInfo, render_hub_card
from .source import (
    GPT2_TOKENIZER,
    card_source_name,
    check_source,
    describe_source,
    find_tokenizer,
    missing_config_error,
)
from .writer import ConversionError, check_output_folder, planned_tensors, write_model_folder

logger = logging.get_logger(__name__)


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
    tensors.check_file_checksums()
    if variant is None and checkpoint.name not in VARIANTS:
        logger.warning(
            f"{describe_source(src, subfolder)}: variant {config.variant} inferred from the weight shapes (the folder "
            "name is no variant). The *_no_scale ablations cannot be told from their weights: if this is one, "
            f"convert again with --variant {config.variant}_no_scale"
        )
    config.dtype = dtype
    found_tokenizer = find_tokenizer(src, subfolder, tokenizer)
    expected_shapes = {key: tuple(t.shape) for key, t in planned_tensors(config, dtype).items()}
    expected_shapes["lm_head.weight"] = expected_shapes["model.embed_tokens.weight"]
    local = os.path.isdir(src)
    info = CardInfo(
        repo_id=repo_id or str(out),
        provenance=(
            f"Converted with `mlra convert original` from the authors' checkpoint `{card_source_name(src, subfolder)}` "
            f"({config.variant}); the float32 conversion reproduces the authors' own forward pass to 1e-4 on their "
            "reference fixtures."
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
