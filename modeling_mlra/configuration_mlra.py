"""MLRA model configuration: one config for the whole latent-attention family (MLA, GLA, MLRA).

Design notes: docs/design.md, sections 2-3 (the family, its index map `MLRAConfig.latent_block`, the math).
"""

import math

from transformers import PreTrainedConfig

# Structure of each family member: latent blocks L, softmax branches B, and the published
# q latent width and MLP width (paper, ~2.9B parameters).
VARIANT_STRUCTURE = {
    "mla": dict(num_latent_blocks=1, num_softmax_branches=1, q_lora_rank=1536, intermediate_size=9448),
    "gla_2": dict(num_latent_blocks=2, num_softmax_branches=1, q_lora_rank=1024, intermediate_size=10048),
    "gla_4": dict(num_latent_blocks=4, num_softmax_branches=1, q_lora_rank=1024, intermediate_size=10136),
    "mlra_2": dict(num_latent_blocks=4, num_softmax_branches=2, q_lora_rank=1024, intermediate_size=10048),
    "mlra_4": dict(num_latent_blocks=4, num_softmax_branches=4, q_lora_rank=1024, intermediate_size=9880),
}
VARIANT_SUFFIXES = ("", "_gated", "_no_scale")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
VARIANTS = tuple(base + suffix for base in VARIANT_STRUCTURE for suffix in VARIANT_SUFFIXES)

# The published dimensions shared by every variant (paper): GPT-2 BPE vocabulary padded to 50304.
PUBLISHED_DIMENSIONS = dict(
    vocab_size=50304,
    hidden_size=3072,
    num_hidden_layers=24,
    num_attention_heads=24,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    max_position_embeddings=2048,
)


def split_variant_name(variant: str) -> tuple[str, bool, bool]:
    """`"mlra_4_gated"` -> `("mlra_4", gated=True, scaled=True)`; raises ValueError for unknown names."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    for suffix in ("_gated", "_no_scale"):
        if variant.endswith(suffix):
            return variant[: -len(suffix)], suffix == "_gated", suffix != "_no_scale"
    return variant, False, True


class MLRAConfig(PreTrainedConfig):
    r"""
    Configuration of the latent-attention family of "Multi-Head Low-Rank Attention" (Liu et al., ICLR 2026).

    The kv latent (`kv_lora_rank` = d_c values per token) is cut into `num_latent_blocks` (L) blocks of width
    d_l = d_c / L. Attention runs `num_softmax_branches` (B) softmaxes per head; heads are cut into
    G = L / B groups, and branch b of a head in group g reads latent block `latent_block(b, g)` = b * G + g.
    MLA is L = B = 1, GLA-n is L = n, B = 1, MLRA-n is L = 4, B = n.

    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: the usual sizes.
        q_lora_rank (`int` or `None`): width d_cq of the query latent; `None` projects queries directly.
        kv_lora_rank (`int`): width d_c of the cached kv latent.
        qk_nope_head_dim, qk_rope_head_dim, v_head_dim: per-head widths d_n, d_r, d_v.
        num_latent_blocks (`int`): L. num_softmax_branches (`int`): B.
        latent_norm (`str`): `"per_block"` (one RMSNorm per latent block, the published models) or `"shared"`
            (one RMSNorm over the whole latent, for TP-friendly conversions of MLA models).
        q_latent_scale, kv_latent_scale, attn_output_scale (`float`, *optional*): the variance-scaling factors
            s_q, s_kv, s_o. Derived when `None`: sqrt(d / d_cq), sqrt(d / d_l), 1 / sqrt(B).
        attention_output_gate (`bool`): sigmoid output gate `sigmoid(W_G x) * o` before `o_proj`.
        rope_parameters (`dict`, *optional*): transformers' RoPE parameters, the one source of RoPE settings (read
            when the model is built): `rope_theta` (default 10000; a `rope_theta=` argument lands here) and
            `rope_type`: `"default"`, `"linear"` (`factor`), `"dynamic"` (`factor`: NTK scaling past
            max_position_embeddings) or `"yarn"` (`factor`, `original_max_position_embeddings`, `mscale`,
            `mscale_all_dim`: DeepSeek's YaRN, whose `mscale_all_dim` also multiplies the softmax scale by mscale^2).
        rope_interleave (`bool`): RoPE convention (rotate-half when `False`, DeepSeek's interleaved pairs when `True`).
        absorbed_max_query_len (`int`): with a cache, queries of at most this many tokens attend through the
            compressed cache in absorbed form; longer ones (prefill chunks) expand the latent per head.
        decode_kernel (`str`): the absorbed decode's implementation: `"auto"` (the fused Triton kernel on CUDA when
            Triton imports and the shapes are supported, else PyTorch), `"triton"` (always the kernel; an error if
            it cannot run) or `"torch"` (always the PyTorch path). The same setting chooses the Triton GEMV for
            the projections of decode steps (`decode_gemv.py`): `"auto"` inside torch.compile on CUDA,
            `"triton"` always, `"torch"` never.
        cache_dtype (`str`, *optional*): `"float8_e4m3fn"` for an fp8 latent cache (latent blocks in e4m3 with a
            float32 scale per token and block, the rope key in the model's dtype); `None` keeps
            the cache in the model's dtype. `MLRACache(config, dtype=...)` and `generate(..., cache_dtype=...)` choose
            it per cache.
        variant (`str`, *optional*): the family member's name when built from a preset, for information.
    """

    model_type = "mlra"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 50304
    hidden_size: int = 3072
    intermediate_size: int = 9880
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    q_lora_rank: int | None = 1024
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    num_latent_blocks: int = 4
    num_softmax_branches: int = 4
    latent_norm: str = "per_block"
    q_latent_scale: float | None = None
    kv_latent_scale: float | None = None
    attn_output_scale: float | None = None
    attention_output_gate: bool = False
    rope_interleave: bool = False
    rope_parameters: dict | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    absorbed_max_query_len: int = 16
    decode_kernel: str = "auto"
    cache_dtype: str | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    variant: str | None = None

    def __post_init__(self, **kwargs):
        self._validate_structure()
        if self.q_latent_scale is None:
            self.q_latent_scale = (self.hidden_size / self.q_lora_rank) ** 0.5 if self.q_lora_rank else 1.0
        if self.kv_latent_scale is None:
            self.kv_latent_scale = (self.hidden_size / self.latent_block_dim) ** 0.5
        if self.attn_output_scale is None:
            self.attn_output_scale = self.num_softmax_branches**-0.5
        self._validate_variant()
        super().__post_init__(**kwargs)
        self.check_rope_parameters()

    def check_rope_parameters(self):
        """A positive base and a RoPE type the model implements (the config's, and again when a model is built from
        it, as `rope_parameters` may have been replaced since)."""
        theta = self.rope_parameters.get("rope_theta")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            raise ValueError(f"MLRAConfig.rope_parameters: rope_theta={theta!r} must be a number above 0 (the RoPE base)")
        if self.rope_parameters["rope_type"] not in ROPE_TYPES:
            raise ValueError(
                f"MLRAConfig.rope_parameters: rope_type {self.rope_parameters['rope_type']!r} is not supported (use "
                f"one of {', '.join(map(repr, ROPE_TYPES))})"
            )

    @property
    def num_key_value_heads(self) -> int:
        """1: the cache holds one shared row per token and layer, the latent and the rope key (no per-head keys)."""
        return 1

    @property
    def head_dim(self) -> int:
        """(d_c + d_r) / 2: what transformers' caches that keep a key and a value per head (the paged cache of
        continuous batching) read to size their pages, so that a key plus a value hold one latent row. The rotary
        width is `qk_rope_head_dim`."""
        return (self.kv_lora_rank + self.qk_rope_head_dim) // 2

    def _validate_sizes(self):
        """Every size a positive integer (q_lora_rank may be None), checked before any arithmetic on them."""
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_latent_blocks",
            "num_softmax_branches", "max_position_embeddings",
        ]  # fmt: skip
        if self.q_lora_rank is not None:
            positive.append("q_lora_rank")
        for field in positive:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MLRAConfig.{field}={value!r} must be a positive integer")
        eps = self.rms_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"MLRAConfig.rms_norm_eps={eps!r} must be a number above 0")
        if self.pad_token_id is not None and not (
            isinstance(self.pad_token_id, int) and 0 <= self.pad_token_id < self.vocab_size
        ):
            raise ValueError(f"MLRAConfig.pad_token_id={self.pad_token_id!r} must be a token id in [0, vocab_size="
                             f"{self.vocab_size})")

    def _validate_variant(self):
        """A named variant must describe the structure it labels (eval picks the paper's row from the name)."""
        if self.variant is None or self.variant not in VARIANTS:
            return
        base, gated, scaled = split_variant_name(self.variant)
        structure = VARIANT_STRUCTURE[base]
        derived_scales = (
            (self.hidden_size / self.q_lora_rank) ** 0.5 if self.q_lora_rank else 1.0,
            (self.hidden_size / self.latent_block_dim) ** 0.5,
            self.num_softmax_branches**-0.5,
        )
        for field, expected in (
            ("num_latent_blocks", structure["num_latent_blocks"]),
            ("num_softmax_branches", structure["num_softmax_branches"]),
            ("attention_output_gate", gated),
            *zip(("q_latent_scale", "kv_latent_scale", "attn_output_scale"), derived_scales if scaled else (1.0,) * 3),
        ):
            if not math.isclose(getattr(self, field), expected, rel_tol=1e-6):
                raise ValueError(f"MLRAConfig.variant={self.variant!r} needs {field}={expected!r}, but the config "
                                 f"has {getattr(self, field)!r}")

    def _validate_structure(self):
        self._validate_sizes()
        rules = [
            (
                "kv_lora_rank",
                self.kv_lora_rank % self.num_latent_blocks == 0,
                f"must be divisible by num_latent_blocks ({self.kv_lora_rank} % {self.num_latent_blocks} != 0)",
            ),
            (
                "num_latent_blocks",
                self.num_latent_blocks % self.num_softmax_branches == 0,
                f"must be divisible by num_softmax_branches ({self.num_latent_blocks} % "
                f"{self.num_softmax_branches} != 0)",
            ),
            ("latent_norm", self.latent_norm in ("per_block", "shared"), "must be 'per_block' or 'shared'"),
            ("qk_rope_head_dim", self.qk_rope_head_dim % 2 == 0, "must be even (RoPE rotates pairs)"),
            ("variant", self.variant is None or self.variant in VARIANTS, f"must be one of {VARIANTS}"),
            ("decode_kernel", self.decode_kernel in ("auto", "triton", "torch"), "must be 'auto', 'triton' or 'torch'"),
            ("cache_dtype", self.cache_dtype in (None, "float8_e4m3fn"), "must be None or 'float8_e4m3fn'"),
        ]
        for field, holds, rule in rules:
            if not holds:
                raise ValueError(f"MLRAConfig.{field}={getattr(self, field)!r} {rule}")
        groups = self.num_latent_blocks // self.num_softmax_branches
        if self.num_attention_heads % groups != 0:
            raise ValueError(
                f"MLRAConfig.num_attention_heads={self.num_attention_heads} must be divisible by the number of head "
                f"groups num_latent_blocks / num_softmax_branches = {groups}"
            )

    @property
    def num_head_groups(self) -> int:
        """G = L / B: heads are cut into G equal groups."""
        return self.num_latent_blocks // self.num_softmax_branches

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_head_groups

    @property
    def latent_block_dim(self) -> int:
        """d_l = d_c / L."""
        return self.kv_lora_rank // self.num_latent_blocks

    def latent_block(self, branch: int, group: int) -> int:
        """The latent block read by softmax branch `branch` of the heads in group `group`: b * G + g.

        Blocks are stored in this order everywhere (weights, cache), so a tensor with a latent-block axis of
        length L views as [B, G] in row-major order: `view(B, G, ...)` puts branch b, group g at block b * G + g.
        """
        return branch * self.num_head_groups + group

    @classmethod
    def from_variant(cls, variant: str, **kwargs) -> "MLRAConfig":
        """A named family member (`mla`, `gla_2`, `gla_4`, `mlra_2`, `mlra_4`, with `_gated` or `_no_scale`)
        with the published ~2.9B dimensions; keyword arguments override any field."""
        base, gated, scaled = split_variant_name(variant)
        fields = {**PUBLISHED_DIMENSIONS, **VARIANT_STRUCTURE[base], "attention_output_gate": gated, "variant": variant}
        if not scaled:
            fields.update(q_latent_scale=1.0, kv_latent_scale=1.0, attn_output_scale=1.0)
        fields.update(kwargs)
        return cls(**fields)


__all__ = ["MLRAConfig", "VARIANTS"]
