"""Loading the authors' published checkpoints (nanoGPT format, Hub repo `Soughing/MLRA`) as they are.

Their `config.json` says `model_type: "gpt2"` and holds nanoGPT fields; the weights are `pytorch_model.bin`
(or shards with `pytorch_model.bin.index.json`) in float32, with per-variant latent keys.
Tensors are memory-mapped and converted one at a time, so loading holds one full copy of the weights at most.

Design notes: docs/design.md, section 4 (both checkpoint formats and the key mapping).
"""

import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers.utils import cached_file, logging

from .configuration_mlra import VARIANTS, MLRAConfig, split_variant_name

logger = logging.get_logger(__name__)

HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")
IGNORED_KWARGS = ("trust_remote_code", "low_cpu_mem_usage", "use_safetensors", "_from_auto")
NANOGPT_FIELDS = dict(
    vocab_size="vocab_size",
    hidden_size="n_embd",
    intermediate_size="intermediate_size",
    num_hidden_layers="n_layer",
    num_attention_heads="n_head",
    q_lora_rank="q_lora_rank",
    kv_lora_rank="kv_lora_rank",
    qk_nope_head_dim="qk_nope_head_dim",
    qk_rope_head_dim="qk_rope_head_dim",
)
LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.c_fc1.weight": "mlp.gate_proj.weight",
    "mlp.c_fc2.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
    "attn.q_a_proj.weight": "self_attn.q_a_proj.weight",
    "attn.q_a_layernorm.weight": "self_attn.q_a_layernorm.weight",
    "attn.q_b_proj.weight": "self_attn.q_b_proj.weight",
    "attn.kv_a_proj_with_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
}


@dataclass
class OriginalCheckpoint:
    """A checkpoint in the authors' format: where its config is and how to fetch its other files."""

    config_file: str
    config: dict
    name: str  # the folder's name, e.g. "mlra_4"
    location: str
    hub_kwargs: dict

    def resolve(self, filename: str) -> str | None:
        return cached_file(
            self.location,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **self.hub_kwargs,
        )


def find_original_checkpoint(pretrained_model_name_or_path, **kwargs) -> OriginalCheckpoint | None:
    """The checkpoint if `config.json` is in the authors' format, else None (then it is ours, or not there)."""
    location = str(pretrained_model_name_or_path)
    hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if kwargs.get(key) is not None}
    config_file = cached_file(
        location,
        "config.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )
    if config_file is None:
        return None
    with open(config_file, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_file}: not valid JSON ({error})") from error
    if config.get("model_type") != "gpt2" or "kv_lora_rank" not in config:
        return None
    name = os.path.basename(os.path.normpath(hub_kwargs.get("subfolder") or location))
    return OriginalCheckpoint(config_file, config, name, location, hub_kwargs)


def load_original_checkpoint(model_class, checkpoint: OriginalCheckpoint, **kwargs):
    """Build `model_class` from an authors' checkpoint. kwargs: variant, dtype/torch_dtype, device_map,
    attn_implementation, and the Hub arguments."""
    variant = kwargs.pop("variant", None)
    dtype = _parse_dtype(kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None))
    device_map = kwargs.pop("device_map", None)
    attn_implementation = kwargs.pop("attn_implementation", None)
    unsupported = sorted(set(kwargs) - set(HUB_KWARGS) - set(IGNORED_KWARGS))
    if unsupported:
        raise TypeError(f"from_pretrained arguments {unsupported} are not supported for the authors' format")

    config, tensors = open_original_checkpoint(checkpoint, variant)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation

    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_class(config)
    expected_shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    state_dict = dict(converted_tensors(tensors, config, dtype, expected_shapes))
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"conversion of {checkpoint.config_file} left missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.config.dtype = dtype
    model.eval()
    return _place(model, device_map)


def open_original_checkpoint(checkpoint: OriginalCheckpoint, variant: str | None = None):
    """The family config of an authors' checkpoint and its `OriginalTensors` (memory-mapped, nothing converted)."""
    tensors = OriginalTensors(checkpoint)
    return _config_from_original(checkpoint, tensors, variant), tensors


class OriginalTensors:
    """The tensors of all weight files, memory-mapped; `take` hands each out once and names its file on errors."""

    def __init__(self, checkpoint: OriginalCheckpoint):
        self.tensors: dict[str, torch.Tensor] = {}
        self.file_of: dict[str, str] = {}
        self.origin: dict[str, str] = {}  # converted key -> "file: original key" of the tensors it came from
        for path in self._weight_files(checkpoint):
            for key, tensor in _read_weight_file(path).items():
                self.tensors[key] = tensor
                self.file_of[key] = path
        self.files = sorted(set(self.file_of.values()))

    @staticmethod
    def _weight_files(checkpoint: OriginalCheckpoint) -> list[str]:
        index_file = checkpoint.resolve("pytorch_model.bin.index.json")
        if index_file is not None:
            with open(index_file, encoding="utf-8") as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as error:
                    raise ValueError(f"{index_file}: not a weight index ({error!r})") from error
            files = []
            for shard in sorted(set(weight_map.values())):
                path = checkpoint.resolve(shard)
                if path is None:
                    raise OSError(f"{index_file} lists {shard}, which is missing from {checkpoint.location}")
                files.append(path)
            return files
        for filename in ("pytorch_model.bin", "model.safetensors"):
            path = checkpoint.resolve(filename)
            if path is not None:
                return [path]
        raise OSError(f"no pytorch_model.bin, index or model.safetensors beside {checkpoint.config_file}")

    def has(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple:
        return tuple(self.tensors[key].shape)

    def take(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise KeyError(f"key {key!r} is missing from {', '.join(self.files)}")
        return self.tensors.pop(key)

    def check_file_checksums(self) -> None:
        """Every byte of the weight files against its stored CRC-32 (one extra read of the files)."""
        for path in self.files:
            check_zip_checksums(path)

    def check_all_taken(self):
        if self.tensors:
            key = sorted(self.tensors)[0]
            raise ValueError(f"unexpected key {key!r} in {self.file_of[key]} ({len(self.tensors)} unexpected keys)")


def check_finite(tensor: torch.Tensor, where: str) -> None:
    """A NaN or Inf in a weight means a corrupted file or diverged training, and a model that silently computes
    NaN logits. `aminmax` finds both in one pass without a temporary of the tensor's size (NaN propagates through
    it); `isfinite().all()` is 200x slower on CPU (benchmarks/results/weight_checks.md)."""
    if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.device.type == "meta":
        return
    low, high = torch.aminmax(tensor)
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise ValueError(f"{where} holds NaN or Inf values (min {low.item()}, max {high.item()}): the file is corrupted "
                         "or the weights diverged")


def check_finite_weights(model: torch.nn.Module, location: str) -> None:
    """`check_finite` on every parameter of a loaded model (those left on the meta device are skipped)."""
    for name, parameter in model.named_parameters():
        check_finite(parameter.detach(), f"{location}: {name}")


def check_tied(key: str, tensor: torch.Tensor, tied_key: str, tied: torch.Tensor, file: str) -> None:
    """A stored copy of a tied weight (dropped on loading) must equal the weight it is tied to."""
    if tensor.shape != tied.shape or not torch.equal(tensor, tied):
        raise ValueError(f"{file}: {key} differs from {tied_key}, but the model ties them (tie_word_embeddings): "
                         "this checkpoint is not one the family can load")


def check_zip_checksums(path: str) -> None:
    """`pytorch_model.bin` is a zip archive holding a CRC-32 of each tensor's bytes, which torch.load never checks:
    overwritten bytes would load as (finite) garbage weights."""
    if not path.endswith(".bin") or not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            corrupted = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise OSError(f"{path}: cannot read the archive ({error})") from error
    if corrupted is not None:
        raise OSError(f"{path}: {corrupted} fails its CRC-32 check: the file is corrupted (download or copy it again)")


def _read_weight_file(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:
        raise OSError(f"{path}: cannot read the weights ({type(error).__name__}: {error})") from error


def infer_variant(tensors: OriginalTensors, num_heads: int, nope_head_dim: int) -> str:
    """The family member from the weight shapes (the `_no_scale` ablations cannot be told apart from weights)."""
    prefix = "transformer.h.0.attn."
    gated = "_gated" if tensors.has(prefix + "gated_proj.weight") else ""
    if tensors.has(prefix + "kv_a_layernorm.weight"):
        return "mla" + gated
    if tensors.has(prefix + "kv_b_proj_1.weight"):
        return "gla_2" + gated
    key = prefix + "kv_b_proj"
    if not tensors.has(key):
        raise KeyError(f"no latent up-projection ({prefix}kv_b_proj*) in {', '.join(tensors.files)}")
    heads_per_block = tensors.shape(key)[-1] // (2 * nope_head_dim)
    by_heads = {num_heads: "mlra_4", num_heads // 2: "mlra_2", num_heads // 4: "gla_4"}
    if heads_per_block not in by_heads:
        raise ValueError(f"{key} has shape {tensors.shape(key)}, which matches no variant with {num_heads} heads")
    return by_heads[heads_per_block] + gated


def _config_from_original(checkpoint: OriginalCheckpoint, tensors: OriginalTensors, variant: str | None):
    missing = [field for field in NANOGPT_FIELDS.values() if field not in checkpoint.config]
    if missing:
        raise KeyError(f"{checkpoint.config_file} lacks the nanoGPT fields {missing}")
    if checkpoint.config.get("bias"):
        raise ValueError(f"{checkpoint.config_file}: bias=true is not part of the published models")
    dims = {ours: checkpoint.config[theirs] for ours, theirs in NANOGPT_FIELDS.items()}
    for ours, theirs in [*NANOGPT_FIELDS.items(), ("max_position_embeddings", "block_size")]:
        value = checkpoint.config.get(theirs, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{checkpoint.config_file}: {theirs}={value!r} must be a positive integer")
    inferred = infer_variant(tensors, dims["num_attention_heads"], dims["qk_nope_head_dim"])
    if variant is None:
        if checkpoint.name in VARIANTS:
            variant = checkpoint.name
        else:
            variant = inferred
            logger.info(f"{checkpoint.location}: variant {variant} inferred from weight shapes (scaled form)")
    base, gated, _ = split_variant_name(variant)
    inferred_base, inferred_gated, _ = split_variant_name(inferred)
    if (base, gated) != (inferred_base, inferred_gated):
        raise ValueError(
            f"variant {variant!r} does not match the weights in {', '.join(tensors.files)}, which are {inferred!r}"
        )
    return MLRAConfig.from_variant(
        variant,
        **dims,
        v_head_dim=dims["qk_nope_head_dim"],
        max_position_embeddings=checkpoint.config.get("block_size", 2048),
    )


def converted_tensors(
    tensors: OriginalTensors, config: MLRAConfig, dtype: torch.dtype, expected_shapes: dict[str, tuple]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (key, tensor) pairs, converted one at a time from the authors' keys (so a consumer that writes each
    one out holds a single converted tensor at a time), each checked against `expected_shapes` (our model's)."""

    def put(key: str, tensor: torch.Tensor, *sources: str) -> tuple[str, torch.Tensor]:
        tensors.origin[key] = " + ".join(f"{tensors.file_of[source]}: {source}" for source in sources)
        if tuple(tensor.shape) != expected_shapes[key]:
            raise ValueError(
                f"{tensors.origin[key]}: shape {tuple(tensor.shape)} does not fit {key} of "
                f"{config.variant}, which needs {expected_shapes[key]}"
            )
        converted = tensor.to(dtype).contiguous()
        check_finite(converted, f"{tensors.origin[key]} (as {str(dtype).removeprefix('torch.')})")
        return key, converted

    if not config.tie_word_embeddings:
        raise ValueError("the authors' models tie lm_head to the embedding")
    embedding = tensors.take("transformer.wte.weight")
    if tensors.has("lm_head.weight"):  # stored although tied to the embedding: it must be the embedding
        file = tensors.file_of["lm_head.weight"]
        check_tied("lm_head.weight", tensors.take("lm_head.weight"), "transformer.wte.weight", embedding, file)
    yield put("model.embed_tokens.weight", embedding, "transformer.wte.weight")

    base = split_variant_name(config.variant)[0]
    for i in range(config.num_hidden_layers):
        theirs, ours = f"transformer.h.{i}.", f"model.layers.{i}."
        for old, new in LAYER_RENAMES.items():
            yield put(ours + new, tensors.take(theirs + old), theirs + old)
        if config.attention_output_gate:
            key = theirs + "attn.gated_proj.weight"
            yield put(ours + "self_attn.o_gate_proj.weight", tensors.take(key), key)

        if base == "mla":
            norm_keys = [theirs + "attn.kv_a_layernorm.weight"]
            up_keys = [theirs + "attn.kv_b_proj.weight"]
            up = tensors.take(up_keys[0]).unsqueeze(0)
        elif base == "gla_2":
            norm_keys = [theirs + f"attn.kv_a_layernorm_{n}.weight" for n in (1, 2)]
            up_keys = [theirs + f"attn.kv_b_proj_{n}.weight" for n in (1, 2)]
            up = torch.stack([tensors.take(key) for key in up_keys])
        else:  # a bare Parameter [L, d_l, hpg * 2 * d_n]
            norm_keys = [theirs + f"attn.kv_a_layernorms.{n}.weight" for n in range(config.num_latent_blocks)]
            up_keys = [theirs + "attn.kv_b_proj"]
            up = tensors.take(up_keys[0]).transpose(1, 2)
        yield put(ours + "self_attn.kv_a_layernorm.weight", torch.cat([tensors.take(k) for k in norm_keys]), *norm_keys)
        yield put(ours + "self_attn.kv_b_proj.weight", up, *up_keys)
    yield put("model.norm.weight", tensors.take("layernorm.weight"), "layernorm.weight")
    tensors.check_all_taken()


def _parse_dtype(dtype) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32  # the dtype the authors' files are stored in
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype")
        return getattr(torch, dtype)
    return dtype


def _place(model, device_map):
    if device_map is None:
        return model
    if isinstance(device_map, (str, int, torch.device)) and device_map != "auto":
        return model.to(device_map)
    from accelerate import dispatch_model, infer_auto_device_map

    if device_map == "auto":
        device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules)
    return dispatch_model(model, device_map=device_map)
