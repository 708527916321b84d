"""The family as an lm-eval model, registered with lm-eval as `mlra`: once this module is imported,
`lm_eval.simple_evaluate(model="mlra", model_args="pretrained=DIR,subfolder=S")` evaluates any family checkpoint,
ours or the authors'."""

from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from modeling_mlra.cli import DEFAULT_MODEL, load_tokenizer, resolve_device_and_dtype
from modeling_mlra.modeling_mlra import MLRAForCausalLM


@register_model("mlra")
class MLRALM(HFLM):
    """lm-eval's `HFLM` on a checkpoint loaded with `MLRAForCausalLM.from_pretrained`, so the authors' nanoGPT
    folders load as well as ours. Everything else is HFLM's: right-padded loglikelihood batches (causal, so padding
    never reaches the scored positions), left-padded generation with an attention mask, and `generate()`, which
    decodes with `MLRACache`.

    Args:
        pretrained: folder or Hub id of the checkpoint (default: the tiny model embedded in the package), or a
            loaded `MLRAForCausalLM` (then `device` and `dtype` are its own).
        subfolder: folder inside `pretrained` holding the checkpoint (e.g. `main/mlra_4` in Soughing/MLRA).
        tokenizer: tokenizer folder or Hub id; default: the checkpoint's own, else GPT-2's from the local cache
            (the authors' checkpoints ship none).
        device, dtype: as `mlra --device/--dtype` (`auto`, `cpu`, `cuda`...; `auto`, `float32`/`fp32`,
            `bfloat16`/`bf16`, `float16`/`fp16`).
        **kwargs: passed to `HFLM` (`batch_size`, `max_length`, ...).
    """

    def __init__(
        self,
        pretrained: str | Path | MLRAForCausalLM = DEFAULT_MODEL,
        subfolder: str = "",
        tokenizer=None,
        device: str | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        **kwargs,
    ):
        if isinstance(pretrained, MLRAForCausalLM):
            model, pretrained = pretrained, pretrained.name_or_path
        else:
            dtype_name = str(dtype or "auto").removeprefix("torch.")
            device, torch_dtype = resolve_device_and_dtype(device or "auto", dtype_name)
            model = MLRAForCausalLM.from_pretrained(pretrained, subfolder=subfolder, dtype=torch_dtype).to(device)
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(str(pretrained), subfolder, None if tokenizer is None else str(tokenizer))
        super().__init__(pretrained=model.eval(), tokenizer=tokenizer, backend="causal", **kwargs)
