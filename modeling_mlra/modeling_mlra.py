"""PyTorch MLRA: the latent-attention family (MLA, GLA, MLRA) of "Multi-Head Low-Rank Attention".

Shapes use: batch `bsz`, new tokens `T`, cached tokens `S`, heads `h`, latent blocks `L`, softmax branches `B`,
head groups `G = L / B`, heads per group `hpg = h / G`, latent width `d_c`, block width `d_l = d_c / L`,
per-head widths `d_n` (no-rope key), `d_r` (rope key), `d_v` (value).

Design notes: docs/design.md (the math and index map, the cache layout, absorbed decode, expanded prefill).
"""

import math
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CompileConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation.utils import DeferredStopCheck
from transformers.masking_utils import find_packed_sequence_indices
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple, logging
from transformers.utils.output_capturing import capture_outputs

from .configuration_mlra import MLRAConfig
from .decode_gemv import MAX_ROWS as GEMV_MAX_ROWS
from .decode_gemv import gemv_linears, mlra_gemv, needs_gradient, reads_as_is
from .latent_write import MAX_ROWS as LATENT_WRITE_MAX_ROWS
from .latent_write import full_cache_message, write_latent_rows
from .mlra_decode_kernel import (
    LatentPages, fp8_cache_layout, kernel_supports, mlra_decode_attention, triton_available,
)
from .original_checkpoint import check_finite_weights, find_original_checkpoint, load_original_checkpoint
from .paged_cache import MLRAPagedLatent, is_paged_cache
from .tensor_parallel import pop_tensor_parallel_arguments, shard_model

logger = logging.get_logger(__name__)

# transformers renamed the cache argument and output field from `past_key_values` to `cache` during 5.x;
# we accept both names and answer with the one the installed release uses.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
STATIC_CACHE_IMPLEMENTATIONS = ("static", "hybrid", "sliding_window", "hybrid_chunked")


class MLRARMSNorm(nn.Module):
    """RMSNorm over `num_groups` equal slices of the last dimension (1: the whole vector).

    The latent norm uses one group per latent block for `latent_norm="per_block"`.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, num_groups: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.num_groups = num_groups

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        grouped = hidden_states.to(torch.float32).unflatten(-1, (self.num_groups, -1))
        variance = grouped.pow(2).mean(-1, keepdim=True)
        normalized = (grouped * torch.rsqrt(variance + self.variance_epsilon)).flatten(-2)
        return self.weight * normalized.to(input_dtype)


class RotaryWidthView:
    """The config as transformers' RoPE functions read it: their `head_dim` is the rotary width d_r (MLRAConfig's
    `head_dim` sizes caches that keep a key and a value per head)."""

    def __init__(self, config: MLRAConfig):
        self.config = config
        self.head_dim = config.qk_rope_head_dim

    def __getattr__(self, name):
        return getattr(self.config, name)


class MLRARotaryEmbedding(nn.Module):
    """cos/sin tables [bsz, T, d_r] for absolute positions, in the rotate-half layout, from `config.rope_parameters`
    alone (as transformers' Llama): "default", or transformers' own "linear", "dynamic" (frequencies recomputed past
    max_position_embeddings by `dynamic_rope_update`) and "yarn" (with its cos/sin factor)."""

    inv_freq: torch.Tensor

    def __init__(self, config: MLRAConfig):
        super().__init__()
        config.check_rope_parameters()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config = RotaryWidthView(config)  # what the RoPE functions (and dynamic_rope_update) read
        self.rope_type = config.rope_parameters["rope_type"]
        self.rope_init_fn = (
            self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
        inv_freq, self.attention_scaling = self.rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: MLRAConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        """Plain RoPE: inverse frequencies [d_r / 2] from `rope_parameters["rope_theta"]`, cos/sin factor 1."""
        dim = config.qk_rope_head_dim
        inv_freq = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq.to(device), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def softmax_scale(config: MLRAConfig) -> float:
    """tau = 1 / sqrt(d_n + d_r); under YaRN with `mscale_all_dim` times mscale^2, DeepSeek's correction of the
    softmax temperature for stretched positions (as transformers' DeepseekV2/V3 attention)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    rope = config.rope_parameters
    if rope["rope_type"] == "yarn" and rope.get("mscale_all_dim") and rope["factor"] > 1:
        mscale = 0.1 * rope["mscale_all_dim"] * math.log(rope["factor"]) + 1.0
        scale *= mscale * mscale
    return scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [bsz, T, heads, d_r] by cos/sin [bsz, T, d_r].

    The interleaved convention (DeepSeek checkpoints: pairs (x0, x1), (x2, x3), ...) is de-interleaved first;
    queries and rope keys get the same permutation, so their dot products are those of the interleaved rotation.
    """
    if interleave:
        x = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


def assert_on_device(holds: torch.Tensor, message: str) -> None:
    """Fail with `message` where the 0-d bool tensor `holds` is False, without waiting for the device: on the CPU in
    eager mode (where reading it costs nothing) a ValueError at once; on an accelerator or under torch.compile an
    asynchronous device assert (kept in compiled graphs) that names `message`. CUDA caps it at 255 characters."""
    if holds.device.type == "cpu" and not torch.compiler.is_compiling():
        if not holds:
            raise ValueError(message)
    else:
        torch._assert_async(holds, message)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids must index the embedding, in [0, vocab_size). On the CPU in eager mode the error names the id;
    elsewhere a device assert checks them without a host synchronisation (see `assert_on_device`)."""
    if input_ids.numel() == 0:
        return
    fix = "encode the text with the tokenizer the model was trained with"
    if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = (int(value) for value in torch.aminmax(input_ids))
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"input_ids holds token id {high if high >= vocab_size else low}, outside the model's vocabulary "
                f"[0, {vocab_size}) (config.vocab_size): {fix}"
            )
    else:
        within = ((input_ids >= 0) & (input_ids < vocab_size)).all()
        assert_on_device(within, f"input_ids holds a token id outside [0, {vocab_size}) (config.vocab_size): {fix}")


FP8_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def cache_dtype_of(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The latent cache's storage dtype from `MLRACache(dtype=...)` or `MLRAConfig.cache_dtype`: None (the model's
    dtype) or torch.float8_e4m3fn."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype not in (None, torch.float8_e4m3fn):
        raise ValueError(f"latent cache dtype {dtype!r} is not supported: use None (the model's dtype) or float8_e4m3fn")
    return dtype


def quantize_latent_rows(states: torch.Tensor, latent_block_dim: int, rope_dim: int) -> torch.Tensor:
    """[bsz, T, d_c + d_r] in the model's dtype -> the fp8 cache's packed rows [bsz, T, row_bytes] (uint8,
    `fp8_cache_layout`): each latent block of each token as e4m3 values and one float32 scale (its largest magnitude
    / 448), the rope key as it is. e4m3 is a floating-point format, so the scale only sets the range: values keep
    about 2^-4 relative precision down to about 2^-15 of the block's largest one."""
    latent, rope_key = states.split([states.shape[-1] - rope_dim, rope_dim], dim=-1)
    num_blocks = latent.shape[-1] // latent_block_dim
    layout = fp8_cache_layout(num_blocks, latent_block_dim, rope_dim, states.dtype)
    blocks = latent.float().unflatten(-1, (-1, latent_block_dim))
    scales = blocks.abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX
    scales = torch.where(scales > 0, scales, 1.0)
    values = (blocks / scales).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    rows = states.new_zeros(*states.shape[:-1], layout.row_bytes, dtype=torch.uint8)
    rows[..., : latent.shape[-1]] = values.flatten(-2).view(torch.uint8)
    rows[..., layout.scales_offset : layout.scales_offset + 4 * num_blocks] = scales.squeeze(-1).view(torch.uint8)
    rows[..., layout.rope_offset : layout.rope_offset + rope_dim * states.element_size()] = (
        rope_key.contiguous().view(torch.uint8)
    )
    return rows


def dequantize_latent_rows(
    rows: torch.Tensor, num_latent_blocks: int, latent_block_dim: int, rope_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """The fp8 cache's packed rows [bsz, S, row_bytes] -> [bsz, S, d_c + d_r] in `dtype`: values times their block's
    scale, rounded to `dtype` (what the decode kernel computes in registers)."""
    layout = fp8_cache_layout(num_latent_blocks, latent_block_dim, rope_dim, dtype)
    values = rows[..., : num_latent_blocks * latent_block_dim].view(torch.float8_e4m3fn).float()
    scales = rows[..., layout.scales_offset : layout.scales_offset + 4 * num_latent_blocks].view(torch.float32)
    latent = (values.unflatten(-1, (num_latent_blocks, latent_block_dim)) * scales[..., None]).flatten(-2).to(dtype)
    rope_key = rows[..., layout.rope_offset : layout.rope_offset + rope_dim * dtype.itemsize].view(dtype)
    return torch.cat([latent, rope_key], dim=-1)


class MLRALatentCacheLayer(CacheLayerMixin):
    """One layer's compressed cache: a buffer [bsz, capacity, d_c + d_r] holding, per token, the scaled normalized
    latent (all L blocks) followed by the rotated rope key. Nothing per head is cached.

    Dynamic (`max_cache_len=None`): capacity grows by doubling, so appending a token copies nothing.
    Static: the buffer is allocated once at `max_cache_len` and written in place (torch.compile, CUDA graphs); it
    keeps its address through every batch operation and reset, so a compiled forward never sees a new tensor. Its
    first `batch_size` rows are the batch: after a batch reduction the spare rows stay allocated, and only a batch
    larger than any before re-allocates it (once per new maximum). The first update after allocation or `reset`
    sets the batch (`starts_batch`).

    fp8 (`cache_dtype=torch.float8_e4m3fn`): each token's row is packed bytes (uint8, `fp8_cache_layout`): the latent
    blocks in e4m3 with a float32 scale per block, the rope key in the model's dtype. `update` returns these rows;
    the decode kernel reads them as they are, the PyTorch paths through `dequantize_latent_rows`.
    """

    is_sliding = False
    is_croppable = True

    def __init__(
        self,
        max_cache_len: int | None = None,
        min_capacity: int = 256,
        cache_dtype: torch.dtype | None = None,
        latent_block_dim: int | None = None,
        rope_dim: int | None = None,
    ):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.min_capacity = min_capacity
        self.cache_dtype = cache_dtype
        self.latent_block_dim, self.rope_dim = latent_block_dim, rope_dim
        if cache_dtype is not None and (latent_block_dim is None or rope_dim is None):
            raise ValueError("an fp8 MLRALatentCacheLayer needs latent_block_dim and rope_dim")
        self.is_compileable = max_cache_len is not None
        self.buffer: torch.Tensor | None = None
        self.batch_size = 0
        self.starts_batch = True
        self.cumulative_length = torch.tensor(0, dtype=torch.long) if self.is_compileable else 0

    def lazy_initialization(self, states: torch.Tensor, *args) -> None:
        bsz, new_tokens, width = states.shape
        capacity = self.max_cache_len or max(new_tokens, self.min_capacity)
        self.initialize(bsz, capacity, width, states.dtype, states.device)

    def initialize(self, rows: int, capacity: int, width: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate the buffer [rows, capacity, width] (empty; the first update sets the batch). width: d_c + d_r
        values in the model's `dtype`; an fp8 cache's packed rows take `fp8_cache_layout(...).row_bytes` bytes."""
        self.dtype, self.device = dtype, device  # the model's dtype (an fp8 cache's rope key)
        if self.cache_dtype is not None:
            num_blocks = (width - self.rope_dim) // self.latent_block_dim
            width = fp8_cache_layout(num_blocks, self.latent_block_dim, self.rope_dim, dtype).row_bytes
        if self.is_compileable:
            self.cumulative_length = self.cumulative_length.to(device)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.cumulative_length)
        self._allocate(rows, capacity, width)
        self.starts_batch = True
        self.is_initialized = True

    def _allocate(self, rows: int, capacity: int, width: int) -> None:
        """A zeroed buffer [rows, capacity, width]; a static one is marked as such for torch.compile."""
        buffer_dtype = self.dtype if self.cache_dtype is None else torch.uint8
        self.buffer = torch.zeros(rows, capacity, width, dtype=buffer_dtype, device=self.device)
        self.batch_size = rows
        if self.is_compileable and not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.buffer)

    def _batch_rows(self) -> torch.Tensor:
        """The rows of the buffer that hold the current batch [bsz, capacity, d_c + d_r]."""
        return self.buffer if self.buffer.shape[0] == self.batch_size else self.buffer[: self.batch_size]

    def update(self, states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Append states [bsz, T, d_c + d_r]; return every cached token [bsz, S, d_c + d_r] (static: the whole buffer)."""
        if not self.is_initialized:
            self.lazy_initialization(states)
        if self.cache_dtype is not None:
            states = quantize_latent_rows(states, self.latent_block_dim, self.rope_dim)
        new_tokens = states.shape[1]
        if self.is_compileable:
            self._make_room(states.shape[0], new_tokens)
            slots = torch.arange(new_tokens, device=self.buffer.device) + self.cumulative_length
            rows = self._batch_rows()
            rows.index_copy_(1, slots, states.to(self.buffer.dtype))
            self.cumulative_length.add_(new_tokens)
            return rows
        end = self.cumulative_length + new_tokens
        if end > self.buffer.shape[1]:
            grown = self.buffer.new_zeros(self.buffer.shape[0], max(end, 2 * self.buffer.shape[1]), self.buffer.shape[2])
            grown[:, : self.cumulative_length] = self.buffer[:, : self.cumulative_length]
            self.buffer = grown
        self.buffer[:, self.cumulative_length : end] = states
        self.cumulative_length = end
        return self.buffer[:, :end]

    def write_projected(
        self, projected: torch.Tensor, query_rope: torch.Tensor, norm: "MLRARMSNorm", scale: float, cos: torch.Tensor,
        sin: torch.Tensor, interleave: bool, fold: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`update` of an initialized static layer in the model's dtype from the projection's output [bsz, T, d_c + d_r]
        before the latent norm (`norm`, then times `scale`) and the rope key's rotation (cos/sin [bsz, T, d_r]): all
        three inside the one launch that writes the rows (`latent_write.write_latent_rows`), which also checks the
        capacity, advances the length, rotates the query's rope heads query_rope [bsz, T, h, d_r] and, given `fold`
        (the W_UK fold's operands, `MLRAAttention.fold_operands`), folds W_UK into the query (no other kernel for
        them). Returns the rows, the rotated query_rope and the absorbed query [B * h, bsz * T, d_l] (or None)."""
        if self.starts_batch:
            self._resize_batch(projected.shape[0])
        rotated, absorbed = write_latent_rows(
            self.buffer, self.cumulative_length, projected, norm.weight, norm.variance_epsilon, norm.num_groups, scale,
            cos, sin, interleave, query_rope, fold,
        )
        return self._batch_rows(), rotated, absorbed

    def _make_room(self, bsz: int, new_tokens: int) -> None:
        """Static layer: take the batch size at the first update of a batch, and fail (on the device, no host
        synchronisation) where `new_tokens` more do not fit."""
        if self.starts_batch:
            self._resize_batch(bsz)
        assert_on_device(
            self.cumulative_length + new_tokens <= self.max_cache_len,
            full_cache_message(self.max_cache_len, new_tokens),
        )

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.is_compileable:
            return self.max_cache_len, 0
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return self.max_cache_len if self.max_cache_len is not None else -1

    def reset(self) -> None:
        if self.is_compileable:
            self.cumulative_length.zero_()
            if self.buffer is not None:
                self.buffer.zero_()
            self.starts_batch = True
        else:
            self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: drop that many tokens from the end. Positive (legacy): keep that many tokens. Zero: nothing, as
        in transformers' layers (generate() calls `crop(-rejected)` after each assisted step, often with 0)."""
        length = int(self.cumulative_length)
        keep = length + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, length)
        if self.is_compileable:
            self.cumulative_length.fill_(max(keep, 0))
        else:
            self.cumulative_length = max(keep, 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """In place: a static buffer keeps its address; a growing one reorders only its filled part."""
        if self.buffer is not None:
            filled = self._batch_rows() if self.is_compileable else self.buffer[:, : self.cumulative_length]
            filled.copy_(filled.index_select(0, beam_idx.to(self.buffer.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each sequence `repeats` times in the batch."""
        if self.buffer is not None:
            self._set_batch(self._batch_rows().repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the sequences at `indices` of the batch."""
        if self.buffer is not None:
            self._set_batch(self._batch_rows()[indices.to(self.buffer.device)])

    def _set_batch(self, rows: torch.Tensor) -> None:
        """Make `rows` [bsz, capacity, d_c + d_r] the batch: a growing buffer is replaced by it; a static one is
        written in place, after one re-allocation if it has fewer than bsz rows."""
        if not self.is_compileable:
            self.buffer, self.batch_size = rows, rows.shape[0]
            return
        self._resize_batch(rows.shape[0])
        self._batch_rows().copy_(rows)

    def _resize_batch(self, rows: int) -> None:
        """A static buffer holds a batch of `rows` sequences from now on; re-allocated only if it has fewer rows."""
        if rows > self.buffer.shape[0]:
            self._allocate(rows, *self.buffer.shape[1:])
        self.batch_size = rows
        self.starts_batch = False

    @property
    def bytes_per_token(self) -> int:
        """Bytes one cached token takes in this layer: (d_c + d_r) x dtype size, or an fp8 cache's packed row."""
        return 0 if self.buffer is None else self.buffer.shape[-1] * self.buffer.element_size()


class MLRACache(Cache):
    """The compressed latent cache of an MLRA model: per layer only the latent and the rope key (d_c + d_r values
    per token; 576 for the published models), never the per-head keys and values.

    Args:
        config: the model's config.
        max_cache_len: `None` for a growing cache; an int for a static, pre-allocated one (torch.compile).
        dtype: `torch.float8_e4m3fn` (or its name) for the fp8 latent cache (672 bytes per token and layer for the
            published shapes against 1152 in bf16); default `config.cache_dtype`, else the model's dtype.
    """

    def __init__(self, config: MLRAConfig, max_cache_len: int | None = None, dtype: torch.dtype | str | None = None):
        self.cache_dtype = cache_dtype_of(dtype if dtype is not None else config.cache_dtype)
        super().__init__(
            layers=[
                MLRALatentCacheLayer(
                    max_cache_len, cache_dtype=self.cache_dtype, latent_block_dim=config.latent_block_dim,
                    rope_dim=config.qk_rope_head_dim,
                )
                for _ in range(config.num_hidden_layers)
            ]
        )

    def update(self, states: torch.Tensor, layer_idx: int, *args, **kwargs) -> torch.Tensor:
        """Append a layer's new states [bsz, T, d_c + d_r] and return all of its cached states."""
        return self.layers[layer_idx].update(states)

    @property
    def max_cache_len(self) -> int | None:
        """The capacity of a static cache in tokens; None for a growing one."""
        return self.layers[0].max_cache_len

    def initialize(self, rows: int, widths: list[int], dtype: torch.dtype, device: torch.device) -> None:
        """Allocate every layer's static buffer now, `rows` x max_cache_len x its width (d_c + d_r, or a tensor-
        parallel rank's share): generate() does, so the prefill of every call sees the same, initialized cache."""
        for layer, width in zip(self.layers, widths):
            layer.initialize(rows, self.max_cache_len, width, dtype, device)

    def fits(self, rows: int, tokens: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this static cache, once reset, holds a new batch of up to `rows` sequences of up to `tokens`
        tokens each in the buffers it has (unallocated ones take any batch)."""
        if self.max_cache_len is None or self.max_cache_len < tokens:
            return False
        return all(
            layer.buffer is None or (layer.buffer.shape[0] >= rows and layer.dtype == dtype and layer.device == device)
            for layer in self.layers
        )

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes in the cache, all layers together, per sequence."""
        return sum(layer.bytes_per_token for layer in self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the cache buffers (capacity, not only the filled part)."""
        return sum(layer.buffer.nbytes for layer in self.layers if layer.buffer is not None)


def attention_mask_for_slots(
    attention_mask: torch.Tensor | None, query_slots: torch.Tensor, kv_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask [bsz or 1, 1, T, S]: query slot i sees key slot j <= i whose attention_mask entry is 1.

    A padding query sees only its own slot, so its (unused) output is finite and the same whatever the cache's
    capacity; real queries never see padding.
    """
    key_slots = torch.arange(kv_length, device=query_slots.device)
    own_slot = (key_slots[None, :] == query_slots[:, None])[None, None]
    allowed = (key_slots[None, :] <= query_slots[:, None])[None, None]
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2D [batch, tokens], got shape {tuple(attention_mask.shape)}")
        keys_valid = F.pad(attention_mask.bool(), (0, kv_length - attention_mask.shape[1]), value=True)
        allowed = (allowed & keys_valid[:, None, None, :]) | own_slot
    return torch.zeros(allowed.shape, dtype=dtype, device=query_slots.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def packed_sequence_mask(sequence_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [bsz, 1, T, T] for rows that pack several sequences (padding-free batches): a token sees the
    earlier tokens of its own sequence only. sequence_ids [bsz, T] numbers each token's sequence (transformers'
    `find_packed_sequence_indices`, from where position_ids restart)."""
    q_len = sequence_ids.shape[1]
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=sequence_ids.device).tril()
    allowed = (causal & (sequence_ids[:, :, None] == sequence_ids[:, None, :]))[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=sequence_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, is_causal=None, **kwargs):
    """Plain softmax attention, softmax in float32 or the inputs' wider dtype: query [bsz, heads, T, d], key [bsz, heads, S, d], value
    [bsz, heads, S, d_v], additive attention_mask [bsz|1, 1, T, S] or None (causal when T > 1) -> [bsz, T, heads, d_v]
    (transformers' attention-interface convention)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    elif query.shape[-2] > 1:
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    # at least float32 (a float64 model keeps float64: a float32 softmax would round rows that differ only in their
    # masked width differently)
    probs = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def use_decode_kernel(
    config: MLRAConfig, num_new_tokens: int, dtype: torch.dtype, device: torch.device,
    cache_dtype: torch.dtype | None = None,
) -> bool:
    """Whether the absorbed decode of `num_new_tokens` per row runs the fused Triton kernel: only where the absorbed
    form runs (at most `config.absorbed_max_query_len` new tokens), as `config.decode_kernel` says ("auto": on CUDA
    only)."""
    if config.decode_kernel == "torch" or num_new_tokens > config.absorbed_max_query_len:
        return False
    supported = kernel_supports(
        config.num_softmax_branches, config.latent_block_dim, config.qk_rope_head_dim, num_new_tokens, dtype,
        cache_dtype,
    )
    if config.decode_kernel == "auto":
        return supported and device.type == "cuda"
    if not supported:
        reason = "Triton does not import" if not triton_available() else "the shapes or dtype are not supported"
        raise ValueError(
            f"MLRAConfig.decode_kernel='triton' but the fused decode kernel cannot run: {reason} (branches "
            f"{config.num_softmax_branches}, latent block {config.latent_block_dim}, rope {config.qk_rope_head_dim}, "
            f"{num_new_tokens} new tokens, {dtype}, cache {cache_dtype or dtype}); use decode_kernel='auto' or 'torch'"
        )
    return True


def use_decode_gemv(config: MLRAConfig, hidden_states: torch.Tensor) -> bool:
    """Whether the projections of a decode step run the Triton GEMV (`decode_gemv.py`: every projection of a one-row
    step; at up to 16 rows the pairs that read one input and the W_UK / W_UV products) as `config.decode_kernel`
    says: "triton" always; "auto" on CUDA inside torch.compile, where CUDA graphs replay its launches (an eager step
    is bound by the host, and a Triton launch costs the host more than a cuBLAS one: H200, 54 against 45 ms per
    eager 24-layer step, benchmarks/results/gemv_h200.md)."""
    if config.decode_kernel == "torch" or not triton_available():
        return False
    return config.decode_kernel == "triton" or (hidden_states.is_cuda and torch.compiler.is_compiling())


def norm_in_gemv(norm: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of `norm` where the GEMV computes what calling it on x would: an MLRARMSNorm (not a subclass)
    over the whole vector, read as it is (`decode_gemv.reads_as_is`); else None (call it). One row of x only: in
    the tl.dot path of 2-16 rows the norm costs the loop 40% more instructions (sm_90, gate + up: 118 -> 170 per
    step, 87 -> 141 registers), and the 16 x 32K step with it ran slower
    (benchmarks/results/decode_step_h200_16x32k_norm_in_gemv.md)."""
    if x.numel() == x.shape[-1] and type(norm) is MLRARMSNorm and norm.num_groups == 1 and reads_as_is(norm, x):
        return norm.weight, norm.variance_epsilon
    return None


def project(
    config: MLRAConfig, hidden_states: torch.Tensor, *linears: nn.Module, swiglu: bool = False,
    norm: nn.Module | None = None, scale: float = 1.0, residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Each of `linears` applied to norm(hidden_states) * scale (norm: an MLRARMSNorm, or None for none); with swiglu
    (gate, up), silu(gate(x)) * up(x); with residual (one output), residual + the output. In one GEMV launch, the
    norm, the scale and the residual inside it, where `use_decode_gemv` says so and the kernel reads the modules as
    they are (`decode_gemv.gemv_linears`, `norm_in_gemv`), else by calling them."""
    if use_decode_gemv(config, hidden_states):
        norm_weight = norm_in_gemv(norm, hidden_states) if norm is not None else None
        if norm is not None and norm_weight is None:
            hidden_states, norm = norm(hidden_states), None
        fused = gemv_linears(
            hidden_states, *linears, swiglu=swiglu, norm=norm_weight, scale=scale, residual=residual
        )
        if fused is not None:
            if swiglu or len(linears) == 1:
                return (fused,)
            return fused.split([linear.out_features for linear in linears], dim=-1)
    if norm is not None:
        hidden_states = norm(hidden_states)
    if scale != 1.0:
        hidden_states = hidden_states * scale
    if swiglu:
        gate, up = linears
        outputs = (F.silu(gate(hidden_states)) * up(hidden_states),)
    else:
        outputs = tuple(linear(hidden_states) for linear in linears)
    return outputs if residual is None else (residual + outputs[0],)


def layer_written_in_one_launch(
    config: MLRAConfig, cache: Cache | None, layer_idx: int, norm: nn.Module, projected: torch.Tensor
) -> MLRALatentCacheLayer | None:
    """The cache layer whose new rows one launch finishes and writes (`MLRALatentCacheLayer.write_projected`): where
    the decode step's projections run the GEMV (`use_decode_gemv`: a compiled step on CUDA), into an initialized
    static MLRACache layer in the model's dtype, at most LATENT_WRITE_MAX_ROWS new rows (bsz x T), with the latent
    norm a plain MLRARMSNorm over the projection's whole latent read as it is; else None (the PyTorch ops, then
    `Cache.update`)."""
    if (
        not isinstance(cache, MLRACache)
        or not use_decode_gemv(config, projected)
        or projected.shape[0] * projected.shape[1] > LATENT_WRITE_MAX_ROWS
    ):
        return None
    layer = cache.layers[layer_idx]
    if not (layer.is_initialized and layer.is_compileable and layer.cache_dtype is None):
        return None
    fits = (
        type(norm) is MLRARMSNorm
        and norm.weight.shape[0] + config.qk_rope_head_dim == projected.shape[-1] == layer.buffer.shape[-1]
        and layer.buffer.dtype == projected.dtype
        and reads_as_is(norm, projected)
    )
    return layer if fits else None


def key_mask_for_kernel(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The decode kernel's key mask [bsz, S] (nonzero: the key may be attended) from a 2D mask [bsz, S], or from
    the last query row of a prepared 4D mask (additive or boolean); the kernel applies the causal rule itself."""
    if attention_mask is None or attention_mask.dim() == 2:
        return attention_mask
    last_row = attention_mask[:, 0, -1, :]
    return last_row if last_row.dtype == torch.bool else last_row == 0


class MLRALatentUpProjection(nn.Linear):
    """The up-projection of the latent blocks: `weight` [L, hpg * (d_n + d_v), d_l], one linear map per latent
    block. Block l serves the heads of group l % G (in order; per head [k_nope | v]) for branch l // G.

    An nn.Linear from d_l to hpg * (d_n + d_v) features applied to each block, so that adapters of linear layers wrap
    it (peft's LoRA with `target_modules=["kv_b_proj"]`: one low-rank update shared by the blocks); the attention
    reads the weight through `MLRAAttention.latent_up_weight`, which sees such an adapter.
    """

    def __init__(self, config: MLRAConfig):
        nn.Module.__init__(self)
        self.in_features = config.latent_block_dim
        self.out_features = config.heads_per_group * (config.qk_nope_head_dim + config.v_head_dim)
        self.weight = nn.Parameter(torch.empty(config.num_latent_blocks, self.out_features, self.in_features))
        self.register_parameter("bias", None)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks [..., L, d_l] -> [..., L, hpg * (d_n + d_v)]: block l through weight[l]."""
        return torch.einsum("...ld,lod->...lo", blocks, self.weight)


class MLRAAttention(nn.Module):
    """Latent attention with L latent blocks and B softmax branches (MLA, GLA and MLRA are special cases)."""

    def __init__(self, config: MLRAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_branches = config.num_softmax_branches
        self.num_groups = config.num_head_groups
        self.heads_per_group = config.heads_per_group
        self.num_latent_blocks = config.num_latent_blocks
        self.latent_block_dim = config.latent_block_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.scaling = softmax_scale(config)
        q_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim

        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * q_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=False)
            self.q_a_layernorm = MLRARMSNorm(config.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, config.kv_lora_rank + config.qk_rope_head_dim, bias=False
        )
        norm_groups = config.num_latent_blocks if config.latent_norm == "per_block" else 1
        self.kv_a_layernorm = MLRARMSNorm(config.kv_lora_rank, eps=config.rms_norm_eps, num_groups=norm_groups)
        self.kv_b_proj = MLRALatentUpProjection(config)
        if config.attention_output_gate:
            self.o_gate_proj = nn.Linear(config.hidden_size, self.num_heads * self.v_head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=False)
        self.o_proj.is_residual_output = True  # zero-initialised (paper)
        self.is_causal = True  # read by transformers' attention functions

    def by_branch_and_group(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """View the latent-block axis `dim` (length L) of `tensor` as [B, G]. Every path reads the latent blocks
        through this view: block l sits at branch l // G, group l % G, i.e. l = MLRAConfig.latent_block(b, g)."""
        return tensor.unflatten(dim, (self.num_branches, self.num_groups))

    def latent_up_weight(self) -> torch.Tensor:
        """kv_b_proj's weight [L, hpg * (d_n + d_v), d_l] as the module applies it. An adapter wrapping the module
        (peft's LoRA) acts through its forward, so a wrapped module's weight is read by applying it to the identity
        (d_l columns per block): every path then sees the adapter. Merged adapters cost nothing."""
        if isinstance(self.kv_b_proj, MLRALatentUpProjection):
            return self.kv_b_proj.weight
        weight = self.kv_b_proj.weight
        identity = torch.eye(self.latent_block_dim, dtype=weight.dtype, device=weight.device)
        columns = self.kv_b_proj(identity[:, None, :].expand(-1, self.num_latent_blocks, -1))  # [d_l, L, out]
        return columns.permute(1, 2, 0)

    def up_projection_per_branch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [B, h, d_n, d_l] and W_UV [B, h, d_v, d_l]: for branch b and head i, the up-projection of the
        latent block the pair reads (group g's heads, in order, concatenate to all h heads)."""
        weight = self.by_branch_and_group(self.latent_up_weight(), 0)  # [B, G, hpg * (d_n + d_v), d_l]
        weight = weight.reshape(self.num_branches, self.num_heads, -1, self.latent_block_dim)
        return weight.split([self.qk_nope_head_dim, self.v_head_dim], dim=2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: MLRACache | None = None,
        decode_kernel_inputs: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None,
        input_norm: MLRARMSNorm | None = None,
        residual: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [bsz, T, d] -> (output [bsz, T, d], attention weights or None). attention_mask: additive
        [bsz|1, 1, T, S] or None (causal). decode_kernel_inputs: (seq_lens [bsz], key_mask [bsz, S] or None,
        row_starts or None) when the absorbed decode runs the fused kernel (see `MLRAModel.forward`). input_norm (the
        layer's input_layernorm) is applied to hidden_states first and residual [bsz, T, d] added to the output, where
        given: inside the projections' GEMV launches in a compiled decode step (`project`). kwargs go to the attention
        function (position_ids, FlashAttention's varlen arguments, ...).

        The weights, returned by the eager implementation only (as transformers' models do), are the softmax
        probabilities of every branch: [bsz, B, h, T, S], branch b of head i attending over latent block
        `latent_block(b, i // hpg)`."""
        bsz, q_len, _ = hidden_states.shape
        if input_norm is not None and self.config.attention_output_gate:  # the output gate reads the normed input too
            hidden_states, input_norm = input_norm(hidden_states), None
        # the two projections of hidden_states, one GEMV launch in a compiled decode step (the input norm in it)
        query_input = self.q_proj if self.config.q_lora_rank is None else self.q_a_proj
        query, latent_and_rope = project(
            self.config, hidden_states, query_input, self.kv_a_proj_with_mqa, norm=input_norm
        )
        if self.config.q_lora_rank is not None:
            (query,) = project(
                self.config, query, self.q_b_proj, norm=self.q_a_layernorm, scale=self.config.q_latent_scale
            )
        query = query.view(bsz, q_len, self.num_heads, -1)
        q_nope, q_rope = query.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        cos, sin = position_embeddings
        norm = self.kv_a_layernorm
        cache_layer = layer_written_in_one_launch(self.config, cache, self.layer_idx, norm, latent_and_rope)
        attends_absorbed = decode_kernel_inputs is not None or (
            cache is not None and q_len <= self.config.absorbed_max_query_len
        )
        q_absorbed = None
        if cache_layer is not None:  # the latent norm, both rotations, the cache write and the W_UK fold: one launch
            fold = self.fold_operands(q_nope) if attends_absorbed else None
            kv_states, q_rope, q_absorbed = cache_layer.write_projected(
                latent_and_rope, q_rope, norm, self.config.kv_latent_scale, cos, sin, self.config.rope_interleave, fold
            )
            if decode_kernel_inputs is not None:
                # the layer's advanced length is every row's: read where it is, so that no kernel computes it per layer
                decode_kernel_inputs = (cache_layer.cumulative_length.expand(bsz), *decode_kernel_inputs[1:])
        else:
            q_rope = apply_rotary_pos_emb(q_rope, cos, sin, self.config.rope_interleave)
            # the rope key is the projection's last d_r columns (a tensor-parallel rank with a shared latent norm
            # projects the whole latent and its norm keeps the rank's blocks)
            rope_dim = self.qk_rope_head_dim
            latent, k_rope = latent_and_rope[..., :-rope_dim], latent_and_rope[..., -rope_dim:]
            latent = norm(latent) * self.config.kv_latent_scale
            k_rope = apply_rotary_pos_emb(k_rope.unsqueeze(2), cos, sin, self.config.rope_interleave).squeeze(2)
            kv_states = torch.cat([latent, k_rope], dim=-1)  # exactly what the cache keeps
            if cache is not None and not isinstance(cache, MLRAPagedLatent):  # pages are written in `paged_attention`
                kv_states = cache.update(kv_states, self.layer_idx)
        if kv_states.dtype == torch.uint8 and decode_kernel_inputs is None:  # the fp8 cache's packed rows
            kv_states = dequantize_latent_rows(
                kv_states, self.num_latent_blocks, self.latent_block_dim, self.qk_rope_head_dim, hidden_states.dtype
            )
        if isinstance(cache, MLRAPagedLatent):  # continuous batching: many sequences packed in one row
            attn_output, attn_weights = self.paged_attention(q_nope, q_rope, kv_states, cache), None
        elif attends_absorbed:
            attn_output, attn_weights = self.absorbed_attention(
                q_nope, q_rope, kv_states, attention_mask, decode_kernel_inputs, q_absorbed
            )
        else:
            attn_output, attn_weights = self.expanded_attention(q_nope, q_rope, kv_states, attention_mask, **kwargs)

        attn_output = attn_output.reshape(bsz, q_len, self.num_heads * self.v_head_dim)
        if self.config.attention_output_gate:
            attn_output = attn_output * torch.sigmoid(self.o_gate_proj(hidden_states))
        (output,) = project(self.config, attn_output, self.o_proj, residual=residual)
        return output, attn_weights

    def paged_attention(self, q_nope, q_rope, kv_states, paged: MLRAPagedLatent) -> torch.Tensor:
        """Continuous batching: kv_states are written into the pages, and each sequence of the packed batch attends to
        its own rows only, so memory and work are linear in the batch's tokens (no scores between sequences).
        Sequences with at most `absorbed_max_query_len` new tokens attend in absorbed form: through the fused kernel
        where it runs (one kernel row per sequence, `paged.kernel_inputs`, without a host synchronisation; it reads
        the pages in place), else one at a time; longer ones (prefill chunks) expand the latent, one at a time, causal
        from their first new token, on their rows gathered from the pages.

        q_nope [1, T, h, d_n], q_rope [1, T, h, d_r], kv_states [1, T, d_c + d_r] (the new tokens' rows) -> [1, T, h,
        d_v] (zeros for padding tokens)."""
        kv_states = paged.update(kv_states, self.layer_idx)  # rows [1, S, d_c + d_r], or LatentPages for the kernel
        longest_absorbed = self.config.absorbed_max_query_len
        sequences = paged.sequences if paged.kernel_inputs is None or paged.max_new_tokens > longest_absorbed else []
        if paged.kernel_inputs is not None:
            rows, _ = self.absorbed_attention(
                paged.to_rows(q_nope), paged.to_rows(q_rope), kv_states, None, paged.kernel_inputs
            )
            output = paged.from_rows(rows)
        else:
            output = q_nope.new_zeros(*q_nope.shape[:3], self.v_head_dim)
        for queries, keys in sequences:
            q_len, kv_len = queries.stop - queries.start, keys.stop - keys.start
            absorbed = q_len <= longest_absorbed
            if absorbed and paged.kernel_inputs is not None:
                continue  # one of the kernel's rows
            causal = q_len == kv_len and not absorbed  # a whole prompt at once: the attention's own causal rule
            query_slots = torch.arange(kv_len - q_len, kv_len, device=q_nope.device)
            mask = None if q_len == 1 or causal else attention_mask_for_slots(None, query_slots, kv_len, q_nope.dtype)
            attend = self.absorbed_attention if absorbed else self.expanded_attention
            rows = kv_states.gather(keys) if isinstance(kv_states, LatentPages) else kv_states[:, keys]
            output[:, queries], _ = attend(q_nope[:, queries], q_rope[:, queries], rows, mask)
        return output

    def expanded_attention(
        self, q_nope, q_rope, kv_states, attention_mask, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention with the latent expanded to per-head keys and values (training, prefill), one softmax branch at
        a time: every branch attends with the same query (no per-branch copies), and only one branch's keys and
        values exist at once, so the transient memory is that of an MLA (DeepSeek) layer of the same size.

        q_nope [bsz, T, h, d_n], q_rope [bsz, T, h, d_r], kv_states [bsz, S, d_c + d_r], attention_mask additive
        [bsz|1, 1, T, S] or None (causal over T == S tokens) -> ([bsz, T, h, d_v], weights [bsz, B, h, T, S] from
        eager, else None). The attention itself runs through transformers' attention interface
        (`config._attn_implementation`: sdpa, eager, flex_attention, ...; switchable with `set_attn_implementation`).
        """
        bsz, q_len = q_nope.shape[:2]
        kv_len = kv_states.shape[1]
        latent, k_rope = kv_states.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        blocks = self.by_branch_and_group(latent.unflatten(-1, (self.num_latent_blocks, self.latent_block_dim)), 2)
        weights = self.by_branch_and_group(self.latent_up_weight(), 0)  # [B, G, hpg * (d_n + d_v), d_l]
        query = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [bsz, h, T, d_n + d_r]
        k_rope = k_rope.unsqueeze(1).expand(bsz, self.num_heads, kv_len, self.qk_rope_head_dim)
        # continuous batching may name its implementations "paged|..."; the paged cache is read in `forward` here
        implementation = (self.config._attn_implementation or "sdpa").removeprefix("paged|")
        flash = implementation.startswith("flash")
        if flash and attention_mask is not None:
            logger.warning_once(f"{implementation} takes no padding or cache masks here: such calls run sdpa")
            implementation = "sdpa"
        if implementation not in ("sdpa", "eager") and not flash and attention_mask is None:
            # other implementations (flex_attention, registered ones) take the causal rule as a mask
            attention_mask = attention_mask_for_slots(None, torch.arange(q_len, device=query.device), kv_len, query.dtype)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        pad_value = flash and self.v_head_dim != query.shape[-1]

        output, branch_probs = None, []
        for branch in range(self.num_branches):
            kv = torch.einsum("bsgd,god->bsgo", blocks[:, :, branch], weights[branch])  # [bsz, S, G, hpg*(d_n+d_v)]
            k_nope, value = kv.reshape(bsz, kv_len, self.num_heads, -1).split(
                [self.qk_nope_head_dim, self.v_head_dim], dim=-1
            )
            key = torch.cat([k_nope.transpose(1, 2), k_rope], dim=-1)  # [bsz, h, S, d_n + d_r]
            value = value.transpose(1, 2)
            if pad_value:  # FlashAttention needs one head size for q, k and v (as transformers' DeepseekV3 does)
                value = F.pad(value, [0, query.shape[-1] - self.v_head_dim])
            branch_output, branch_weights = attention(
                self,
                query,
                key,
                value,
                attention_mask,
                scaling=self.scaling,
                dropout=0.0,
                is_causal=attention_mask is None and q_len > 1,
                **kwargs,
            )
            branch_output = branch_output[..., : self.v_head_dim]
            output = branch_output if output is None else output + branch_output
            branch_probs.append(branch_weights)
        probs = torch.stack(branch_probs, dim=1) if branch_probs[0] is not None else None
        return output * self.config.attn_output_scale, probs

    def fold_operands(self, q_nope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The W_UK fold as one GEMV launch reads it, where the GEMV runs it (`decode_gemv.mlra_gemv`): the no-rope
        query's rows [h, 1, bsz * T, d_n] (every sequence's new tokens; a view of the query projection's output) and
        W_UK [B * h, 1, d_l, d_n] (a view of the up-projection's weight: a batch dimension in matmul would broadcast
        it to every sequence, a copy at each step); else None (more rows than the GEMV takes, or a gradient wanted)."""
        bsz, q_len = q_nope.shape[:2]
        rows = q_nope.permute(2, 0, 1, 3).reshape(self.num_heads, 1, bsz * q_len, self.qk_nope_head_dim)
        w_uk = self.up_projection_per_branch()[0]
        if bsz * q_len > GEMV_MAX_ROWS or not use_decode_gemv(self.config, q_nope) or needs_gradient(rows, w_uk):
            return None
        return rows, w_uk.transpose(-1, -2).flatten(0, 1)[:, None]

    def absorbed_attention(
        self, q_nope, q_rope, kv_states, attention_mask, decode_kernel_inputs=None, q_absorbed=None
    ) -> torch.Tensor:
        """Attention straight on the compressed cache (decode): W_UK is folded into the query and W_UV applied
        after the softmax, so the cached latent is read as it is and never expanded per head.

        q_nope [bsz, T, h, d_n], q_rope [bsz, T, h, d_r], kv_states [bsz, S, d_c + d_r] -> [bsz, T, h, d_v].
        With decode_kernel_inputs (seq_lens [bsz], key_mask [bsz, S] or None, row_starts or None) the softmax part
        runs in the fused Triton kernel (`mlra_decode_kernel.py`), else in PyTorch with the additive attention_mask.
        row_starts [bsz] (continuous batching): kv_states [1, total, d_c + d_r] packs the rows one after another, row n
        from token row_starts[n], or is `LatentPages` (the pages, read in place by the kernel). q_absorbed [B * h,
        bsz * T, d_l]: the fold already done (by the cache write's launch). Also returns the softmax probabilities
        [bsz, B, h, T, S] with the eager implementation (PyTorch path), else None.
        """
        w_uk, w_uv = self.up_projection_per_branch()
        bsz, q_len = q_nope.shape[:2]
        # One GEMM per (branch, head) whose rows are every sequence's new tokens (`fold_operands`); where the cache
        # write's launch has done it (q_absorbed given), the GEMV runs here too (W_UV)
        fold = self.fold_operands(q_nope) if q_absorbed is None else None
        gemv = q_absorbed is not None or fold is not None
        if fold is not None:  # every (branch, head) in one launch
            q_absorbed = mlra_gemv(*fold)
        if q_absorbed is not None:
            q_absorbed = q_absorbed.view(self.num_branches, self.num_heads, bsz * q_len, -1)
        else:
            rows = q_nope.permute(2, 0, 1, 3).reshape(self.num_heads, bsz * q_len, self.qk_nope_head_dim)
            q_absorbed = torch.matmul(rows, w_uk)
        q_absorbed = q_absorbed.unflatten(2, (bsz, q_len)).permute(2, 0, 1, 3, 4)  # [bsz, B, h, T, d_l]
        probs = None
        if decode_kernel_inputs is not None:
            seq_lens, key_mask, row_starts = decode_kernel_inputs
            mixed = mlra_decode_attention(
                q_absorbed.permute(0, 3, 1, 2, 4), q_rope, kv_states, seq_lens, key_mask, self.num_groups,
                self.scaling, row_starts=row_starts,
            ).permute(0, 2, 3, 1, 4)
        else:
            mixed, probs = self.absorbed_softmax(q_absorbed, q_rope, kv_states, attention_mask)
        mixed = mixed.permute(1, 2, 0, 3, 4).reshape(self.num_branches, self.num_heads, bsz * q_len, -1)
        scale = self.config.attn_output_scale
        if gemv:  # the branches as segments of one reduction per head, the scale in the same launch
            output = mlra_gemv(mixed.transpose(0, 1), w_uv.transpose(0, 1), scale=scale)  # [h, bsz * T, d_v]
        else:
            output = torch.matmul(mixed, w_uv.transpose(-1, -2)).sum(dim=0) * scale  # [h, bsz * T, d_v]
        weights = probs if self.config._attn_implementation == "eager" else None
        return output.unflatten(1, (bsz, q_len)).permute(1, 2, 0, 3), weights

    def absorbed_softmax(self, q_absorbed, q_rope, kv_states, attention_mask) -> torch.Tensor:
        """The PyTorch softmax part of `absorbed_attention`: q_absorbed [bsz, B, h, T, d_l] -> (the softmax-weighted
        latent blocks [bsz, B, h, T, d_l], the probabilities [bsz, B, h, T, S]), a handful of batched GEMMs over the
        [B, G] view of the cache."""
        bsz, _, _, q_len, _ = q_absorbed.shape
        kv_len = kv_states.shape[1]
        B, G, hpg = self.num_branches, self.num_groups, self.heads_per_group
        latent, k_rope = kv_states.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        blocks = latent.unflatten(-1, (self.num_latent_blocks, self.latent_block_dim))
        blocks = self.by_branch_and_group(blocks, 2).permute(0, 2, 3, 1, 4)  # [bsz, B, G, S, d_l]

        q_absorbed = q_absorbed.reshape(bsz, B, G, hpg * q_len, self.latent_block_dim)
        scores = torch.matmul(q_absorbed, blocks.transpose(-1, -2)).view(bsz, B, G, hpg, q_len, kv_len)
        # one GEMM of all heads' rope queries against the shared rope key (read once, not once per head)
        q_rope = q_rope.transpose(1, 2).reshape(bsz, self.num_heads * q_len, self.qk_rope_head_dim)
        rope_scores = torch.matmul(q_rope, k_rope.transpose(1, 2))  # [bsz, h * T, S]
        scores = (scores + rope_scores.view(bsz, 1, G, hpg, q_len, kv_len)) * self.scaling
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, None, None]
        probs = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(latent.dtype)

        mixed = torch.matmul(probs.view(bsz, B, G, hpg * q_len, kv_len), blocks)  # [bsz, B, G, hpg*T, d_l]
        return (
            mixed.view(bsz, B, self.num_heads, q_len, self.latent_block_dim),
            probs.view(bsz, B, self.num_heads, q_len, kv_len),
        )


class MLRAMLP(nn.Module):
    def __init__(self, config: MLRAConfig):
        super().__init__()
        self.config = config
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.down_proj.is_residual_output = True  # zero-initialised (paper)

    def forward(
        self, x: torch.Tensor, norm: MLRARMSNorm | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [..., d] -> down_proj(silu(gate_proj(x)) * up_proj(x)) [..., d]; norm (the layer's RMSNorm) applied to x
        first and residual [..., d] added to the output, where given. In a compiled decode step gate and up are one
        GEMV launch (the norm and silu(gate) * up in it) and down_proj another (the residual in it)."""
        (gated,) = project(self.config, x, self.gate_proj, self.up_proj, swiglu=True, norm=norm)
        (output,) = project(self.config, gated, self.down_proj, residual=residual)
        return output


class MLRADecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MLRAConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLRAAttention(config, layer_idx)
        self.mlp = MLRAMLP(config)
        self.input_layernorm = MLRARMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MLRARMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        # each norm is applied by the projections that read it and each residual added by the projection that ends
        # its branch: in a compiled decode step, inside their GEMV launches (`project`)
        hidden_states, _ = self.self_attn(
            hidden_states, position_embeddings, attention_mask, cache=cache, input_norm=self.input_layernorm,
            residual=hidden_states, **kwargs,
        )
        return self.mlp(hidden_states, norm=self.post_attention_layernorm, residual=hidden_states)


class MLRAPreTrainedModel(PreTrainedModel):
    config_class = MLRAConfig
    config: MLRAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MLRADecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # output_hidden_states / output_attentions (argument or config) are recorded by transformers' hooks
    _can_record_outputs = {"hidden_states": MLRADecoderLayer, "attentions": MLRAAttention}

    @torch.no_grad()
    def _init_weights(self, module):
        """Normal(0, initializer_range) everywhere, norms at one, attention and MLP output projections at zero."""
        if getattr(module, "is_residual_output", False):
            init.zeros_(module.weight)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, MLRARMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MLRARotaryEmbedding):
            inv_freq, _ = module.rope_init_fn(module.config)
            init.copy_(module.inv_freq, inv_freq.to(module.inv_freq.device))
            init.copy_(module.original_inv_freq, inv_freq.to(module.inv_freq.device))


def _take_cache_argument(cache, kwargs: dict):
    """The cache passed as `cache=` (transformers >= 5.2x) or `past_key_values=` (earlier 5.x): an MLRACache, or the
    PagedAttentionCache of continuous batching (whose pages the config sizes to hold the latent)."""
    legacy = kwargs.pop("past_key_values", None)
    cache = cache if cache is not None else legacy
    if cache is not None and not isinstance(cache, MLRACache) and not is_paged_cache(cache):
        raise TypeError(
            f"MLRA models cache only the compressed latent and need an MLRACache; got {type(cache).__name__} "
            "as the cache argument. Pass `MLRACache(model.config)` or leave the argument out."
        )
    return cache


def past_length_is_zero(cache: MLRACache | None) -> bool:
    """Whether no token precedes the new ones: no cache, or an empty growing one (a static cache's length is a device
    tensor, not read here)."""
    return cache is None or (not cache.is_compileable and cache.get_seq_length() == 0)


class MLRAModel(MLRAPreTrainedModel):
    def __init__(self, config: MLRAConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MLRADecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MLRARMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MLRARotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: MLRACache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids [bsz, T] (or inputs_embeds [bsz, T, d]); attention_mask [bsz, past + T] with 0 for padding;
        position_ids [bsz, T] (default: from attention_mask, so left padding gets the right positions; restarts at 0
        within a row mark packed sequences). `output_hidden_states`, `output_attentions` and `return_dict` default
        to the config's; attentions come from the eager implementation (see `MLRAAttention.forward`).

        Continuous batching passes a PagedAttentionCache, its sequences packed in one row with their positions, their
        cumulative lengths and the cache's read/write indices (in kwargs); its block-diagonal mask is not read."""
        cache = _take_cache_argument(cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        if inputs_embeds.shape[1] == 0:
            raise ValueError(f"the input holds no tokens (shape {list(inputs_embeds.shape[:2])}): give at least one")
        if is_paged_cache(cache):
            return self._forward_paged(inputs_embeds, position_ids, cache, kwargs)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = MLRACache(self.config)
        if not use_cache:
            cache = None

        bsz, q_len = inputs_embeds.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0
        query_slots = torch.arange(q_len, device=inputs_embeds.device) + past_length
        # A 2D mask covers exactly the cached tokens and the new ones; any other length would silently shift the
        # positions derived from it and mask the wrong slots, so refuse it.
        if (
            attention_mask is not None
            and attention_mask.dim() == 2
            and not torch.compiler.is_compiling()
            and attention_mask.shape[1] != past_length + q_len
        ):
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} tokens but the cache holds {int(past_length)} and "
                f"{q_len} are new: pass the mask of the whole sequence, cached tokens included"
            )
        # Padding-free packed rows (several sequences per row, position_ids restarting at 0, no mask; what
        # DataCollatorWithFlattening gives): each sequence attends only to itself, as in transformers' models. Found
        # only when nothing is cached before these tokens (packed tokens are not a context to decode from).
        packed_sequences = None
        if attention_mask is None and position_ids is not None and past_length_is_zero(cache):
            packed_sequences = find_packed_sequence_indices(position_ids.expand(bsz, -1))
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            else:
                position_ids = query_slots.unsqueeze(0)
        decode_kernel_inputs = None
        expanded = cache is None or q_len > self.config.absorbed_max_query_len
        # the fused kernel returns no attention weights
        output_attentions = kwargs.get("output_attentions", getattr(self.config, "output_attentions", False))
        if packed_sequences is not None:
            # FlashAttention finds the sequences in position_ids itself (its varlen path), for a single row
            flash_varlen = expanded and bsz == 1 and (self.config._attn_implementation or "").startswith("flash")
            mask = None if flash_varlen else packed_sequence_mask(packed_sequences, inputs_embeds.dtype)
        elif (
            cache is not None
            and not output_attentions
            and use_decode_kernel(
                self.config, q_len, inputs_embeds.dtype, inputs_embeds.device, getattr(cache, "cache_dtype", None)
            )
        ):
            # The kernel takes per-row lengths and the key mask as they are: no additive mask, no host sync.
            if cache.is_compileable:
                # from the query's slots, not the cache's length tensor: the first layer's cache update advances that,
                # and a compiled step reading its old value after the update would copy it first (an inductor kernel
                # more)
                seq_lens = query_slots[-1:] + 1
            else:
                seq_lens = torch.full((1,), past_length + q_len, device=inputs_embeds.device)
            seq_lens = seq_lens.expand(bsz)
            decode_kernel_inputs = (seq_lens, key_mask_for_kernel(attention_mask), None)
            mask = None
        else:
            mask = self._attention_mask(attention_mask, query_slots, cache, inputs_embeds.dtype)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                position_embeddings,
                mask,
                cache=cache,
                decode_kernel_inputs=decode_kernel_inputs,
                position_ids=position_ids,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache})

    def _forward_paged(self, inputs_embeds, position_ids, cache, batch_kwargs) -> BaseModelOutputWithPast:
        """One step of continuous batching: the sequences packed in inputs_embeds [1, T, d] write their latent rows
        into the paged cache and attend to their own rows only (`MLRAAttention.paged_attention`). Where the fused
        kernel runs (`config.decode_kernel`: "auto" on CUDA), the sequences with at most `absorbed_max_query_len` new
        tokens are its rows, as wide as the most new tokens among them."""
        if self.config.cache_dtype is not None:
            logger.warning_once(
                f"config.cache_dtype={self.config.cache_dtype!r} applies to MLRACache; the pages of continuous "
                "batching hold the latent in the dtype transformers gives them (the model's)"
            )
        paged = MLRAPagedLatent(cache, batch_kwargs)
        longest_absorbed = self.config.absorbed_max_query_len
        row_width = paged.max_new_tokens
        if row_width > longest_absorbed:  # a prefill chunk (the host knows the lengths): rows as wide as the others
            widths = [queries.stop - queries.start for queries, _ in paged.sequences]
            row_width = max((width for width in widths if width <= longest_absorbed), default=0)
        if row_width and use_decode_kernel(self.config, row_width, inputs_embeds.dtype, inputs_embeds.device):
            paged.use_kernel_rows(inputs_embeds.shape[1], row_width)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states, position_embeddings, None, cache=paged, position_ids=position_ids
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache})

    def _attention_mask(self, attention_mask, query_slots, cache, dtype) -> torch.Tensor | None:
        """None where plain causal attention over the given tokens is exact, else an additive mask. A 4D mask was
        prepared ahead (MLRAForCausalLM.create_masks_for_generate) and is used as it is."""
        if attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.dtype != torch.bool or attention_mask.shape[-2] != 1:
                return attention_mask
            # the decode kernel's padding-only form [bsz, 1, 1, S] (create_masks_for_generate) on a step that runs
            # in PyTorch after all (output_attentions): the causal rule is added back from its 2D form
            attention_mask = attention_mask[:, 0, 0]
        q_len = len(query_slots)
        if cache is not None and cache.is_compileable:  # one mask shape at every step, and no look at its values
            return attention_mask_for_slots(attention_mask, query_slots, cache.get_mask_sizes(q_len, 0)[0], dtype)
        no_padding = attention_mask is None or (
            not torch.compiler.is_compiling() and attention_mask.dim() == 2 and bool(attention_mask.all())
        )
        # Plain causal attention is exact without a cache, and in the expanded path on an empty growing one (prefill:
        # the fast causal kernels, no [T, S] mask); one new token sees every cached one.
        fresh_prefill = q_len > self.config.absorbed_max_query_len and cache is not None and cache.get_seq_length() == 0
        if no_padding and (cache is None or q_len == 1 or fresh_prefill):
            return None
        kv_length = cache.get_mask_sizes(q_len, 0)[0] if cache is not None else q_len
        return attention_mask_for_slots(attention_mask, query_slots, kv_length, dtype)


# Devices where generate() reads its stop decision one step late (MLRAForCausalLM._sample): measured on an H200.
DEFERRED_STOP_CHECK_DEVICES = ("cuda",)


class AlwaysDeferredStopCheck(DeferredStopCheck):
    """transformers' deferred stop check, taken wherever `MLRAForCausalLM._sample` has found it exact (transformers'
    own test takes it on MPS only)."""

    @staticmethod
    def is_supported(*args, **kwargs) -> bool:
        return True


def _with_deferred_stop_check(sample):
    """transformers' decoding loop `sample` (GenerationMixin._sample) as it is, except that it takes
    `AlwaysDeferredStopCheck`: a copy of the function whose globals name that class `DeferredStopCheck`, so that
    transformers' module and every other model's generate() are left alone."""
    names = dict(sample.__globals__, DeferredStopCheck=AlwaysDeferredStopCheck)
    copy = types.FunctionType(sample.__code__, names, sample.__name__, sample.__defaults__, sample.__closure__)
    copy.__kwdefaults__ = sample.__kwdefaults__
    return copy


_sample_with_deferred_stop_check = _with_deferred_stop_check(GenerationMixin._sample)


class MLRAForCausalLM(MLRAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MLRAConfig):
        super().__init__(config)
        self.model = MLRAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: MLRACache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """labels [bsz, T]: next-token cross-entropy (shifted inside; -100 ignored). logits_to_keep: only the
        last n positions' logits (0: all). `return_dict=False` (argument or config) gives a tuple of the fields that
        are not None."""
        cache = _take_cache_argument(cache, kwargs)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,  # whatever config.return_dict says: the fields are read below
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        (logits,) = project(self.config, hidden_states[:, slice_indices, :], self.lm_head)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode=None, batch_size=None, max_cache_length=None, *args,
        **kwargs,
    ):
        """generate() gets an MLRACache: growing by default, static for `cache_implementation="static"`; its dtype from
        `generate(..., cache_config={"dtype": torch.float8_e4m3fn})` (transformers' argument for the cache's
        constructor), else `config.cache_dtype`.

        A static cache is sized as transformers sizes its own: generate()'s `max_cache_length` (prompt or
        `inputs_embeds` plus new tokens), or `max_cache_len` when larger, or the largest size of an earlier call.
        Unlike a fresh cache per call, one static cache is kept on the model and reset for every call that fits in
        it with the same batch, so a compiled forward sees the same buffers (and never recompiles) call after call.
        """
        if CACHE_FIELD != "cache" and model_kwargs.get("cache") is not None:
            # A cache passed as `cache=` (the newer releases' name) to a release that calls it `past_key_values`:
            # give it generate()'s name so it is the user's cache there too, not a second cache built beside it.
            model_kwargs[CACHE_FIELD] = model_kwargs.pop("cache")
        cache_options = dict(generation_config.cache_config or {})
        cache_dtype = cache_options.pop("dtype", None)
        implementation = generation_config.cache_implementation
        if cache_options:
            raise ValueError(f"generate(cache_config=...) takes only 'dtype' for an MLRACache, not {sorted(cache_options)}")
        if cache_dtype is not None and model_kwargs.get(CACHE_FIELD) is not None:
            raise ValueError(
                f"generate() got both cache_config={{'dtype': ...}} and {CACHE_FIELD}: choose the dtype when building "
                "the cache"
            )
        if model_kwargs.get(CACHE_FIELD) is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs
            )
        if implementation not in (None, "dynamic", *STATIC_CACHE_IMPLEMENTATIONS):
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported by MLRA models, which keep only the "
                "compressed latent: use 'dynamic' (default) or 'static'"
            )
        if implementation not in STATIC_CACHE_IMPLEMENTATIONS:
            model_kwargs[CACHE_FIELD] = MLRACache(self.config, dtype=cache_dtype)
            return
        if max_cache_length is None:
            max_cache_length = generation_config.max_length - 1
        rows = max(generation_config.num_beams, generation_config.num_return_sequences or 1) * (batch_size or 1)
        needed = max(max_cache_length, generation_config.max_cache_len or 0)
        cache = getattr(self, "_static_generation_cache", None)
        cache_dtype = cache_dtype_of(cache_dtype if cache_dtype is not None else self.config.cache_dtype)
        if cache is not None and cache.cache_dtype == cache_dtype and cache.fits(rows, needed, self.dtype, self.device):
            cache.reset()
        else:
            previous = cache.max_cache_len if cache is not None else 0
            cache = MLRACache(self.config, max_cache_len=max(needed, previous), dtype=cache_dtype)
            widths = [layer.self_attn.kv_lora_rank + layer.self_attn.qk_rope_head_dim for layer in self.model.layers]
            cache.initialize(rows, widths, self.dtype, self.device)
            self._static_generation_cache = cache
        model_kwargs[CACHE_FIELD] = cache

    def _default_compile_config(self) -> CompileConfig:
        """generate()'s torch.compile of the decode step on a static cache when `generation_config.compile_config`
        is not set: one graph without breaks (the forward is written for it; a break would fail loudly instead of
        silently slowing every token), static shapes (the static cache keeps them), CUDA graphs (reduce-overhead)."""
        return CompileConfig(fullgraph=True, dynamic=False)

    def _sample(
        self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False, streamer=None,
        **model_kwargs,
    ):
        """transformers' greedy and sampling loop. After every step that loop reads on the host whether all sequences
        have finished, so the host cannot queue step t+1 while the GPU runs step t: each token costs the step plus
        the host's work between two steps. Where it is exact and nothing of the cache leaves generate()
        (`_defers_stop_check`), the loop takes transformers' own `DeferredStopCheck` instead, which reads that flag
        one step late: the same tokens and the same streamer output (each token put one step later); a stop before
        `max_length` costs one more step, whose token is dropped and whose cache row is never read (the kept static
        cache is reset by the next call). On an H200 at batch 1 the streamed interval goes from 1.31x to 1.04x the
        compiled step (benchmarks/results/generate_interval_h200.md)."""
        sample = super()._sample
        if self._defers_stop_check(input_ids.device, generation_config, synced_gpus, model_kwargs.get(CACHE_FIELD)):
            sample = types.MethodType(_sample_with_deferred_stop_check, self)
        return sample(
            input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=synced_gpus,
            streamer=streamer, **model_kwargs,
        )  # fmt: skip

    def _defers_stop_check(self, device, generation_config, synced_gpus, cache) -> bool:
        """Whether `_sample` reads the stop decision one step late: on a device of `DEFERRED_STOP_CHECK_DEVICES`, for
        the static cache generate() keeps on the model (the cache of the compiled step), and only where the extra
        step leaves no trace: no dict returned (it would hand back the cache with the extra row), no peers stepping
        together (synced_gpus), not as an assistant model."""
        return (
            device.type in DEFERRED_STOP_CHECK_DEVICES
            and cache is not None
            and cache is getattr(self, "_static_generation_cache", None)
            and not generation_config.return_dict_in_generate
            and not synced_gpus
            and not generation_config.is_assistant
        )

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, **kwargs) -> torch.Tensor | None:
        """generate() builds the mask before each forward when the cache is static, so that a compiled forward sees
        one shape at every step: our additive mask [bsz, 1, T, max_cache_len] (transformers' generic builder
        knows nothing of the latent cache). Where the step runs the fused decode kernel, which applies the causal
        rule itself, only the padding is needed: the 2D mask padded to the capacity, as [bsz, 1, 1, max_cache_len]
        booleans (two small launches on the host's critical path of every step, not a dozen)."""
        cache = _take_cache_argument(kwargs.pop("cache", None), kwargs)
        q_len = inputs_embeds.shape[1]
        if use_decode_kernel(
            self.config, q_len, inputs_embeds.dtype, inputs_embeds.device, getattr(cache, "cache_dtype", None)
        ):
            if attention_mask is None or attention_mask.dim() != 2:
                return attention_mask
            capacity = cache.get_mask_sizes(q_len, 0)[0]
            return F.pad(attention_mask.bool(), (0, capacity - attention_mask.shape[1]), value=True)[:, None, None]
        query_slots = torch.arange(q_len, device=inputs_embeds.device) + cache.get_seq_length()
        return self.model._attention_mask(attention_mask, query_slots, cache, inputs_embeds.dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Loads our format (safetensors + MLRAConfig) or, detected from config.json, the authors' nanoGPT format
        (a local folder or a Hub repo with `subfolder=`). For the authors' format, `variant=` names the family
        member (e.g. "mlra_4_gated"); otherwise the folder name or the weight shapes choose it.

        Under torchrun, `tp_plan="auto"` (or `tp_size=N`, `distributed_config=DistributedConfig(tp_size=N)`,
        `device_mesh=`) splits the model over the processes by latent block (docs/tensor_parallel.md)."""
        tensor_parallel = pop_tensor_parallel_arguments(kwargs)
        group = tensor_parallel.process_group() if tensor_parallel is not None else None
        original = find_original_checkpoint(pretrained_model_name_or_path, **kwargs)
        if original is None:
            model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
            # about 1 s per 5.8 GB on one CPU core (benchmarks/results/weight_checks.md); NaN weights would
            # otherwise give NaN logits at every step
            check_finite_weights(model[0] if isinstance(model, tuple) else model, str(pretrained_model_name_or_path))
        else:
            model = load_original_checkpoint(cls, original, **kwargs)
        return model if group is None else shard_model(model, group)

    def save_pretrained(self, *args, **kwargs):
        if getattr(self, "tensor_parallel", None) is not None:
            raise ValueError("this model is split for tensor parallelism; save the checkpoint it was loaded from")
        return super().save_pretrained(*args, **kwargs)


__all__ = ["MLRACache", "MLRAForCausalLM", "MLRAModel", "MLRAPreTrainedModel"]
