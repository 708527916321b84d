"""`mlra convert mla`: MLA models into the family, exactly (the member MLA) or TP-friendly (TPLA, arXiv 2508.15881).

Sources: transformers `deepseek_v2` / `deepseek_v3` checkpoints with dense MLPs, our `mla` member, or the authors'
`mla` checkpoints. DeepSeek's MLA is our MLA without variance scaling (s_q = s_kv = s_o = 1), with interleaved
RoPE, optionally YaRN, and `kv_b_proj` [h * (d_n + d_v), d_c], which is our `kv_b_proj.weight` with L = 1.
"""

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, GenerationConfig
from transformers.utils import cached_file

from modeling_mlra import MLRAConfig, MLRAForCausalLM
from modeling_mlra.configuration_mlra import split_variant_name
from modeling_mlra.original_checkpoint import (
    check_finite,
    check_tied,
    check_zip_checksums,
    converted_tensors,
    find_original_checkpoint,
    open_original_checkpoint,
)

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

DEEPSEEK_TYPES = ("deepseek_v2", "deepseek_v3")
# transformers' DeepseekV2/V3 build q_a_layernorm and kv_a_layernorm with this eps whatever rms_norm_eps says
DEEPSEEK_LATENT_NORM_EPS = 1e-6


@dataclass
class MLASource:
    """An MLA checkpoint seen as the family member MLA: its config and its tensors under our names."""

    config: MLRAConfig
    tensors: Iterator[tuple[str, torch.Tensor]]
    kind: str  # "deepseek_v3", "mlra", "authors"
    generation_config: GenerationConfig | None = None


class CheckpointFiles:
    """The tensors of a transformers checkpoint (safetensors, sharded or not, or pytorch_model.bin), read lazily."""

    def __init__(self, location: str, subfolder: str):
        kwargs = dict(subfolder=subfolder, _raise_exceptions_for_missing_entries=False)
        index = cached_file(location, "model.safetensors.index.json", **kwargs)
        if index is not None:
            weight_map = json.loads(Path(index).read_text())["weight_map"]
            paths = {name: cached_file(location, name, **kwargs) for name in sorted(set(weight_map.values()))}
            missing = [name for name, path in paths.items() if path is None]
            if missing:
                raise ConversionError(f"{index} lists {missing[0]}, which is missing")
            files = list(paths.values())
        else:
            single = cached_file(location, "model.safetensors", **kwargs) or cached_file(
                location, "pytorch_model.bin", **kwargs
            )
            if single is None:
                raise ConversionError(f"{describe_source(location, subfolder)}: no model.safetensors, index or pytorch_model.bin")
            files = [single]
        self.file_of: dict[str, str] = {}
        self.handles = {}
        for path in files:
            if path.endswith(".safetensors"):
                self.handles[path] = safe_open(path, framework="pt")
                keys = self.handles[path].keys()
            else:
                check_zip_checksums(path)
                self.handles[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                keys = self.handles[path].keys()
            self.file_of.update(dict.fromkeys(keys, path))

    def take(self, key: str) -> torch.Tensor:
        if key not in self.file_of:
            raise ConversionError(f"key {key!r} is missing from {', '.join(sorted(self.handles))}")
        path = self.file_of.pop(key)
        handle = self.handles[path]
        tensor = handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]
        check_finite(tensor, f"{path}: {key}")
        return tensor

    def has(self, key: str) -> bool:
        return key in self.file_of

    def check_all_taken(self) -> None:
        if self.file_of:
            key = sorted(self.file_of)[0]
            raise ConversionError(f"unexpected key {key!r} in {self.file_of[key]} ({len(self.file_of)} unexpected keys)")


def mla_config_from_deepseek(source, config_file: str) -> MLRAConfig:
    """The family member MLA computing exactly what transformers' DeepseekV2/V3 computes, or a ConversionError
    naming what is not supported."""
    dense_layers = source.first_k_dense_replace or 0
    if dense_layers < source.num_hidden_layers:
        raise ConversionError(
            f"{config_file}: layer {dense_layers} is a mixture-of-experts layer (first_k_dense_replace="
            f"{source.first_k_dense_replace}, num_hidden_layers={source.num_hidden_layers}); MoE layers are not "
            "supported yet"
        )
    unsupported = [
        ("hidden_act", source.hidden_act != "silu", "the family's MLP is SwiGLU (silu)"),
        ("attention_bias", bool(source.attention_bias), "the family's projections have no bias"),
        ("mlp_bias", bool(getattr(source, "mlp_bias", False)), "the family's MLP has no bias"),
        ("rms_norm_eps", source.rms_norm_eps != DEEPSEEK_LATENT_NORM_EPS,
         f"the family uses one eps for every norm and DeepSeek's latent norms use {DEEPSEEK_LATENT_NORM_EPS}"),
        ("rope_parameters", source.rope_parameters.get("rope_type", "default") not in ("default", "yarn"),
         "only default and yarn RoPE are supported"),
    ]
    for name, fails, reason in unsupported:
        if fails:
            raise ConversionError(f"{config_file}: {name}={getattr(source, name)!r} is not supported ({reason})")
    return MLRAConfig(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        q_lora_rank=source.q_lora_rank,
        kv_lora_rank=source.kv_lora_rank,
        qk_nope_head_dim=source.qk_nope_head_dim,
        qk_rope_head_dim=source.qk_rope_head_dim,
        v_head_dim=source.v_head_dim,
        num_latent_blocks=1,
        num_softmax_branches=1,
        q_latent_scale=1.0,
        kv_latent_scale=1.0,
        attn_output_scale=1.0,
        # V2 rotates interleaved pairs as complex numbers; V3 has the flag
        rope_interleave=bool(getattr(source, "rope_interleave", True)),
        rope_parameters=dict(source.rope_parameters),
        max_position_embeddings=source.max_position_embeddings,
        rms_norm_eps=source.rms_norm_eps,
        initializer_range=source.initializer_range,
        tie_word_embeddings=source.tie_word_embeddings,
        pad_token_id=source.pad_token_id,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        variant="mla_no_scale",
    )


def renamed_tensors(files: CheckpointFiles, config: MLRAConfig, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensors from a transformers-format MLA checkpoint whose keys are ours, except `kv_b_proj` [out, d_c]
    (an nn.Linear there, one latent block [1, out, d_c] here). Consumed in our model's order."""
    for key in planned_tensors(config, dtype):
        tensor = files.take(key)
        yield key, (tensor.unsqueeze(0) if key.endswith("kv_b_proj.weight") and tensor.dim() == 2 else tensor)
        if key == "model.embed_tokens.weight" and config.tie_word_embeddings and files.has("lm_head.weight"):
            file = files.file_of["lm_head.weight"]
            check_tied("lm_head.weight", files.take("lm_head.weight"), key, tensor, file)
    files.check_all_taken()


def open_mla_source(src: str, subfolder: str, dtype: torch.dtype) -> MLASource:
    hub_kwargs = dict(subfolder=subfolder) if subfolder else {}
    original = find_original_checkpoint(src, **hub_kwargs)
    if original is not None:
        config, tensors = open_original_checkpoint(original)
        if split_variant_name(config.variant)[0] != "mla":
            raise ConversionError(f"{original.config_file}: the weights are {config.variant}, not MLA")
        tensors.check_file_checksums()
        expected = {key: tuple(t.shape) for key, t in planned_tensors(config, dtype).items()}
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
        return MLASource(config, converted_tensors(tensors, config, dtype, expected), "authors")

    config_file = cached_file(
        src, "config.json", _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False, **hub_kwargs,
    )
    if config_file is None:
        raise missing_config_error(src, subfolder)
    model_type = json.loads(Path(config_file).read_text()).get("model_type")
    generation_file = cached_file(src, "generation_config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    generation = GenerationConfig.from_pretrained(os.path.dirname(generation_file)) if generation_file else None
    if model_type in DEEPSEEK_TYPES:
        config = mla_config_from_deepseek(AutoConfig.from_pretrained(src, **hub_kwargs), config_file)
    elif model_type == "mlra":
        config = MLRAConfig.from_pretrained(src, **hub_kwargs)
        if config.num_latent_blocks != 1:
            raise ConversionError(f"{config_file}: num_latent_blocks={config.num_latent_blocks}; this is not MLA")
    else:
        raise ConversionError(
            f"{config_file}: unknown architecture (model_type {model_type!r}); `mlra convert mla` reads "
            f"{', '.join(DEEPSEEK_TYPES)}, mlra with one latent block, and the authors' mla checkpoints"
        )
    files = CheckpointFiles(src, subfolder)
    return MLASource(config, renamed_tensors(files, config, dtype), model_type, generation)


def hadamard(dim: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix [dim, dim] (dim a power of two)."""
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < dim:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / math.sqrt(dim)


@torch.no_grad()
def pca_rotations(model: MLRAForCausalLM, calibration_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the rows of R are the principal directions of the RMS-normalized latent (before the norm
    weight) on the calibration blocks [n, T], in order of decreasing variance."""
    config = model.config
    covariances = [torch.zeros(config.kv_lora_rank, config.kv_lora_rank, dtype=torch.float64) for _ in model.model.layers]

    def hook(index):
        def accumulate(module, inputs, output):
            latent = output[..., : config.kv_lora_rank].double().flatten(0, -2)
            normalized = latent * torch.rsqrt(latent.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
            covariances[index] += normalized.T @ normalized

        return accumulate

    handles = [
        layer.self_attn.kv_a_proj_with_mqa.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)
    ]
    try:
        for block in calibration_ids:
            model(block[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    rotations = []
    for covariance in covariances:
        _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
        rotations.append(vectors.flip(-1).T.contiguous())
    return rotations


@torch.no_grad()
def to_tensor_parallel(
    model: MLRAForCausalLM, blocks: int, rotation: str, calibration_ids: torch.Tensor | None = None
) -> MLRAForCausalLM:
    """The TPLA form of an MLA member: L = B = `blocks`, one shared RMSNorm over the whole latent, s_o = 1.

    The norm weight (and s_kv) is folded into the up-projection first, so the normalized latent n can be rotated
    by an orthogonal R (RMS(R z) = RMS(z), so norm and rotation commute): W_DKV's latent rows become R W_DKV and
    W_UKV becomes W_UKV diag(g s_kv) R^T, an exact rewrite; then the latent is sliced into `blocks` blocks, each
    read by its own softmax branch (the approximation).
    """
    config = model.config
    if config.num_latent_blocks != 1:
        raise ConversionError(f"the tp conversion starts from MLA (num_latent_blocks=1), not {config.num_latent_blocks}")
    d_c = config.kv_lora_rank
    if rotation == "hadamard" and d_c & (d_c - 1):
        raise ConversionError(f"--rotation hadamard needs kv_lora_rank a power of two, not {d_c}")
    if rotation == "pca":
        if calibration_ids is None:
            raise ConversionError("--rotation pca needs --calibration FILE")
        rotations = pca_rotations(model, calibration_ids)
    else:
        fixed = hadamard(d_c) if rotation == "hadamard" else torch.eye(d_c, dtype=torch.float64)
        rotations = [fixed] * config.num_hidden_layers

    tp_config = MLRAConfig.from_dict(
        {
            **config.to_dict(),
            "num_latent_blocks": blocks,
            "num_softmax_branches": blocks,
            "latent_norm": "shared",
            "kv_latent_scale": 1.0,
            "attn_output_scale": 1.0,
            "variant": None,
            "architectures": None,
            "auto_map": None,
        }
    )
    state_dict = {key: value.clone() for key, value in model.state_dict().items()}
    for i, rotation_matrix in enumerate(rotations):
        prefix = f"model.layers.{i}.self_attn."
        dtype = state_dict[prefix + "kv_b_proj.weight"].dtype
        down = state_dict[prefix + "kv_a_proj_with_mqa.weight"].double()
        norm = state_dict[prefix + "kv_a_layernorm.weight"].double()
        up = state_dict[prefix + "kv_b_proj.weight"][0].double() * (norm * config.kv_latent_scale)
        down[:d_c] = rotation_matrix @ down[:d_c]
        up = up @ rotation_matrix.T  # [h * (d_n + d_v), d_c]
        state_dict[prefix + "kv_a_proj_with_mqa.weight"] = down.to(dtype)
        state_dict[prefix + "kv_a_layernorm.weight"] = torch.ones(d_c, dtype=dtype)
        state_dict[prefix + "kv_b_proj.weight"] = up.unflatten(1, (blocks, d_c // blocks)).transpose(0, 1).to(dtype)
    with torch.device("meta"):
        converted = MLRAForCausalLM(tp_config)
    converted.load_state_dict(state_dict, assign=True, strict=False)
    converted.tie_weights()
    converted.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.clone()
    return converted.eval()


@torch.no_grad()
def compare_logits(reference: MLRAForCausalLM, converted: MLRAForCausalLM, blocks_of_ids: torch.Tensor) -> dict:
    """Perplexity of both models on the token blocks [n, T] (next-token prediction) and the mean per-token
    KL(reference || converted) of their next-token distributions."""
    totals = dict(reference_nll=0.0, converted_nll=0.0, kl=0.0, tokens=0)
    for block in blocks_of_ids:
        ids = block[None]
        log_p = torch.log_softmax(reference(ids, use_cache=False).logits.double(), -1)[0, :-1]
        log_q = torch.log_softmax(converted(ids, use_cache=False).logits.double(), -1)[0, :-1]
        targets = block[1:]
        totals["reference_nll"] -= log_p.gather(-1, targets[:, None]).sum().item()
        totals["converted_nll"] -= log_q.gather(-1, targets[:, None]).sum().item()
        totals["kl"] += (log_p.exp() * (log_p - log_q)).sum().item()
        totals["tokens"] += len(targets)
    n = totals["tokens"]
    return dict(
        perplexity_before=math.exp(totals["reference_nll"] / n),
        perplexity_after=math.exp(totals["converted_nll"] / n),
        kl=totals["kl"] / n,
        tokens=n,
    )


def token_blocks(tokenizer, text: str, block_size: int) -> torch.Tensor:
    """Consecutive non-overlapping blocks [n, block_size] of the text's tokens (the tail that does not fill one
    is dropped)."""
    ids = torch.tensor(tokenizer(text)["input_ids"])
    n = len(ids) // block_size
    if n == 0:
        raise ConversionError(f"the calibration text has {len(ids)} tokens, fewer than one block of {block_size}")
    return ids[: n * block_size].view(n, block_size)


def convert_mla(
    src: str,
    out: Path,
    mode: str,
    blocks: int = 4,
    rotation: str = "hadamard",
    calibration: Path | None = None,
    subfolder: str = "",
    dtype: torch.dtype = torch.float32,
    tokenizer: str | None = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    repo_id: str | None = None,
) -> Path:
    """Convert an MLA checkpoint at `src` into `out`: `mode="exact"` (the member MLA, streamed tensor by tensor) or
    `mode="tp"` (the TPLA form, built in memory; with a calibration text its measured error is printed)."""
    check_output_folder(Path(out), overwrite)
    check_source(src, subfolder)
    if calibration is not None and not Path(calibration).is_file():
        raise ConversionError(f"--calibration {calibration}: no such file")
    source = open_mla_source(src, subfolder, torch.float32 if mode == "tp" else dtype)
    # the authors' models use the GPT-2 tokenizer without shipping it; other sources ship their own
    fallback = GPT2_TOKENIZER if source.kind == "authors" else None
    found_tokenizer = find_tokenizer(src, subfolder, tokenizer, fallback=fallback)
    config, tensors = source.config, source.tensors
    where = card_source_name(src, subfolder)
    provenance = f"Converted with `mlra convert mla --mode {mode}` from the MLA checkpoint `{where}` ({source.kind})"
    limitations = []
    if mode == "exact":
        provenance += "; the float32 conversion computes the source model's logits to rounding (tested to 1e-4)."
    else:
        reference = MLRAForCausalLM(config)
        reference.load_state_dict(dict(tensors), strict=False, assign=True)
        reference.tie_weights()
        reference.eval()
        calibration_ids = None
        if calibration is not None:
            if found_tokenizer is None:
                raise ConversionError("--calibration needs a tokenizer: pass --tokenizer")
            text = Path(calibration).read_text(encoding="utf-8")
            calibration_ids = token_blocks(found_tokenizer, text, min(config.max_position_embeddings, 512))
        converted = to_tensor_parallel(reference, blocks, rotation, calibration_ids)
        provenance += (
            f", in the TPLA form: L = B = {blocks} latent blocks with a shared latent norm and unit output scale, the "
            f"latent rotated ({rotation}) before it is sliced. This is an approximation of the source model."
        )
        if calibration_ids is not None:
            measured = compare_logits(reference, converted, calibration_ids)
            print(
                f"tp conversion on {calibration} ({measured['tokens']} tokens): perplexity "
                f"{measured['perplexity_before']:.3f} -> {measured['perplexity_after']:.3f}, KL {measured['kl']:.4f} nats/token"
            )
            provenance += (
                f" Measured on the calibration text ({measured['tokens']} tokens): perplexity "
                f"{measured['perplexity_before']:.3f} before, {measured['perplexity_after']:.3f} after; mean KL "
                f"{measured['kl']:.4f} nats per token."
            )
        limitations.append("TP-friendly conversion: the logits differ from the source model's (see above).")
        config = converted.config
        tensors = ((key, value) for key, value in converted.state_dict().items()
                   if not (config.tie_word_embeddings and key == "lm_head.weight"))
    config.dtype = dtype
    if found_tokenizer is not None:
        tokenizer_id = repo_id or str(out)
    else:
        tokenizer_id = GPT2_TOKENIZER if source.kind == "authors" else src
    info = CardInfo(
        repo_id=repo_id or str(out),
        provenance=provenance,
        tokenizer_id=tokenizer_id,
        base_model=None if os.path.isdir(src) else src,
        limitations=limitations,
    )
    return write_model_folder(
        out, config, tensors, dtype=dtype, readme=render_hub_card(config, info), tokenizer=found_tokenizer,
        generation_config=source.generation_config, max_shard_size=max_shard_size, overwrite=overwrite,
    )
