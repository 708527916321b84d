"""Triton kernel that writes a decode step's new cache rows into the static latent cache in one launch.

What the static cache keeps per token is [norm(latent) * kv_latent_scale | rope(k_rope)] (docs/design.md, "The
compressed cache"). In PyTorch that is an RMSNorm per latent block (a reduction), a scale, the rotation of the rope key, a
concatenation and an `index_copy_` into the buffer: under torch.compile inductor ran them as four to five small
kernels per layer (a 1 x 16 decode step of the 2.9B model: about 5 us per layer, benchmarks/results/
decode_step_h200_final.md). Here one program per new token reads the projection's output row (latent and rope key
side by side, as `kv_a_proj_with_mqa` gives them) and stores the finished row at its slot:

    rows[n, start + t] = [ (w * norm_g(x[n, t, :d_c])) * scale | rope(x[n, t, d_c:], cos[n, t], sin[n, t]) ]

the latent with the roundings of the PyTorch path in the model's dtype (the norm in float32, rounded, times its
weight, rounded, times the scale, rounded: the values eager PyTorch stores, bit for bit on the H200 in float16 and
bfloat16), the rotation in float32 rounded once, as inductor's kernel of the compiled step did (eager PyTorch rounds
its two products first: on the H200 a quarter of the rotated values were one unit in the last place apart).
`write_latent_rows` is a torch custom op that mutates the buffer in place, so torch.compile(fullgraph=True) and CUDA
graphs capture it (inductor passes it the cache buffer itself, no copy).
"""

import torch

from .mlra_decode_kernel import triton, triton_available

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _write_latent_rows_kernel(
        projected_ptr, norm_ptr, cos_ptr, sin_ptr, rows_ptr, start_ptr, eps, scale,
        stride_pn, stride_pt, stride_cn, stride_ct, stride_rn, stride_rs,
        GROUPS: tl.constexpr, GROUP_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, INTERLEAVE: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        n = tl.program_id(0)
        t = tl.program_id(1)
        source = projected_ptr + n * stride_pn + t * stride_pt
        target = rows_ptr + n * stride_rn + (tl.load(start_ptr) + t) * stride_rs
        dtype = rows_ptr.dtype.element_ty

        # the latent: an RMSNorm over each of GROUPS slices of GROUP_DIM values, times its weight and the scale
        offs_g = tl.arange(0, BLOCK_G)[:, None]
        offs_d = tl.arange(0, BLOCK_D)[None, :]
        in_latent = (offs_g < GROUPS) & (offs_d < GROUP_DIM)
        columns = offs_g * GROUP_DIM + offs_d
        x = tl.load(source + columns, mask=in_latent, other=0.0).to(tl.float32)
        variance = tl.sum(x * x, axis=1) / GROUP_DIM
        normalized = (x * tl.rsqrt(variance + eps)[:, None]).to(dtype)
        weight = tl.load(norm_ptr + columns, mask=in_latent, other=0.0)
        latent = (weight.to(tl.float32) * normalized.to(tl.float32)).to(dtype)
        latent = (latent.to(tl.float32) * scale).to(dtype)
        tl.store(target + columns, latent, mask=in_latent)

        # the rope key, rotate-half form: its halves (the even and odd values where the checkpoint interleaves them,
        # stored de-interleaved, as `apply_rotary_pos_emb` does)
        half = ROPE_DIM // 2
        offs_r = tl.arange(0, BLOCK_R)
        in_half = offs_r < half
        rope_source = source + GROUPS * GROUP_DIM
        if INTERLEAVE:
            first = tl.load(rope_source + 2 * offs_r, mask=in_half, other=0.0).to(tl.float32)
            second = tl.load(rope_source + 2 * offs_r + 1, mask=in_half, other=0.0).to(tl.float32)
        else:
            first = tl.load(rope_source + offs_r, mask=in_half, other=0.0).to(tl.float32)
            second = tl.load(rope_source + half + offs_r, mask=in_half, other=0.0).to(tl.float32)
        tables = n * stride_cn + t * stride_ct
        cos_first = tl.load(cos_ptr + tables + offs_r, mask=in_half, other=0.0).to(tl.float32)
        cos_second = tl.load(cos_ptr + tables + half + offs_r, mask=in_half, other=0.0).to(tl.float32)
        sin_first = tl.load(sin_ptr + tables + offs_r, mask=in_half, other=0.0).to(tl.float32)
        sin_second = tl.load(sin_ptr + tables + half + offs_r, mask=in_half, other=0.0).to(tl.float32)
        rotated_first = first * cos_first - second * sin_first
        rotated_second = second * cos_second + first * sin_second
        rope_target = target + GROUPS * GROUP_DIM
        tl.store(rope_target + offs_r, rotated_first.to(dtype), mask=in_half)
        tl.store(rope_target + half + offs_r, rotated_second.to(dtype), mask=in_half)

    @torch.library.custom_op("mlra::write_latent_rows", mutates_args=("buffer",))
    def _write_latent_rows_op(
        buffer: torch.Tensor, start: torch.Tensor, projected: torch.Tensor, norm_weight: torch.Tensor, eps: float,
        groups: int, scale: float, cos: torch.Tensor, sin: torch.Tensor, interleave: bool,
    ) -> None:
        _write_latent_rows(buffer, start, projected, norm_weight, eps, groups, scale, cos, sin, interleave)

    @_write_latent_rows_op.register_fake
    def _(buffer, start, projected, norm_weight, eps, groups, scale, cos, sin, interleave):
        return None


def _write_latent_rows(buffer, start, projected, norm_weight, eps, groups, scale, cos, sin, interleave) -> None:
    bsz, new_tokens, width = projected.shape
    latent_dim = norm_weight.shape[0]
    rope_dim = width - latent_dim
    cos, sin = cos.expand(bsz, new_tokens, rope_dim), sin.expand(bsz, new_tokens, rope_dim)
    group_dim = latent_dim // groups
    _write_latent_rows_kernel[(bsz, new_tokens)](
        projected, norm_weight, cos, sin, buffer, start, eps, scale,
        projected.stride(0), projected.stride(1), cos.stride(0), cos.stride(1), buffer.stride(0), buffer.stride(1),
        GROUPS=groups, GROUP_DIM=group_dim, ROPE_DIM=rope_dim, INTERLEAVE=interleave,
        BLOCK_G=triton.next_power_of_2(groups), BLOCK_D=triton.next_power_of_2(group_dim),
        BLOCK_R=triton.next_power_of_2(max(rope_dim // 2, 1)), num_warps=4 if latent_dim >= 256 else 1,
    )


def write_latent_rows(
    buffer: torch.Tensor, start: torch.Tensor, projected: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    groups: int, scale: float, cos: torch.Tensor, sin: torch.Tensor, interleave: bool,
) -> None:
    """Write rows [n, start + t] of buffer [rows >= bsz, capacity, d_c + d_r] (the model's dtype) from projected
    [bsz, T, d_c + d_r] (latent then rope key): the latent through an RMSNorm of `groups` slices (norm_weight [d_c],
    eps) times `scale`, the rope key rotated by cos/sin [bsz or 1, T, d_r] (rotate-half tables; `interleave`: the
    key's values come in pairs and are stored de-interleaved). start: a 0-d integer tensor on the buffer's device
    (the slot of the first new token, read by the kernel: no host synchronisation)."""
    bsz, _, width = projected.shape
    if buffer.dim() != 3 or buffer.shape[0] < bsz or buffer.shape[2] != width or buffer.dtype != projected.dtype:
        raise ValueError(
            f"write_latent_rows needs a buffer [>= {bsz}, capacity, {width}] of {projected.dtype}, got "
            f"{tuple(buffer.shape)} of {buffer.dtype}"
        )
    if norm_weight.shape[0] % groups or norm_weight.shape[0] >= width or buffer.stride(2) != 1:
        raise ValueError(
            f"write_latent_rows: a latent of {norm_weight.shape[0]} values in {groups} groups within rows of {width} "
            f"(contiguous) is needed, got buffer strides {buffer.stride()}"
        )
    projected = projected.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()  # the kernel reads each table's last axis with unit stride
    if torch.compiler.is_compiling():
        _write_latent_rows_op(buffer, start, projected, norm_weight, eps, groups, scale, cos, sin, interleave)
    else:
        _write_latent_rows(buffer, start, projected, norm_weight, eps, groups, scale, cos, sin, interleave)


__all__ = ["triton_available", "write_latent_rows"]
