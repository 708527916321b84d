"""Triton kernel for the rope and the cache write of a decode step's layer, in one launch: the new cache rows written
into the static latent cache, its length advanced, the query's rope heads rotated and W_UK folded into its no-rope
heads.

What the static cache keeps per token is [norm(latent) * kv_latent_scale | rope(k_rope)] (docs/design.md, "The
compressed cache"). In PyTorch that is an RMSNorm per latent block (a reduction), a scale, the rotation of the rope key, a
concatenation and an `index_copy_` into the buffer, then the capacity check and the length's increment, beside the
rotation of the query's rope heads: under torch.compile inductor ran them as five to six small kernels per layer (a
1 x 16 decode step of the 2.9B model: about 5 us per layer, benchmarks/results/decode_step_h200_final.md). Here
program 0 reads the cache's length L, the projection's output rows (latent and rope key side by side, as
`kv_a_proj_with_mqa` gives them) of all bsz x T new tokens, stores the finished rows at their slots

    rows[n, L + t] = [ (w * norm_g(x[n, t, :d_c])) * scale | rope(x[n, t, d_c:], cos[n, t], sin[n, t]) ]

and then L + T as the new length (one program, after a barrier: no thread can still be reading L); programs 1 to
bsz x T each rotate the query's rope heads of one new token by the same tables, rope(q[n, t, i, d_n:]) for every
head i. Where L + T exceeds the buffer's capacity nothing is written to the cache and it fails: a device assert (the
kernel is compiled with debug on, as inductor compiles its kernels that assert), on the CPU a ValueError before the
launch (Triton's interpreter skips device asserts). So the capacity check, the length's increment and the query's
rotation cost no inductor kernel of their own. The programs after those compute the absorbed query, the W_UK fold
(one GEMV tile each, `decode_gemv._gemv_weight`: the tiles and results of the GEMV's own launch), which reads the
same query projection's output: a decode step's layer is then one launch fewer (the fold's launch waited for the
projection's as this one does).

The latent has the roundings of the PyTorch path in the model's dtype (the norm in float32, rounded, times its
weight, rounded, times the scale, rounded: the values eager PyTorch stores, bit for bit on the H200 in float16 and
bfloat16), the rotations are in float32 rounded once, as inductor's kernels of the compiled step did (eager PyTorch
rounds its two products first: on the H200 a quarter of the rotated values were one unit in the last place apart).
`write_latent_rows` is a torch custom op (`mlra::write_latent_rows`, with the fold `mlra::write_latent_rows_and_fold`)
that mutates the buffer and the length in place and returns the rotated query (and the absorbed one), so
torch.compile(fullgraph=True) and CUDA graphs capture it (inductor passes it the cache's tensors themselves, no copy)
and order it before whatever reads the length.
"""

import torch

from .decode_gemv import MAX_ROWS as GEMV_MAX_ROWS
from .decode_gemv import SINGLE, gemv_config, tile_constants
from .mlra_decode_kernel import _num_sms, triton, triton_available

MAX_ROWS = GEMV_MAX_ROWS  # bsz x T: one program holds them all, the rows of a decode step's GEMV

FULL_CACHE_FIX = "pass a larger `max_cache_len` to MLRACache or a larger `max_length` to generate()"


def full_cache_message(capacity: int, new_tokens: int) -> str:
    """The error of a static cache of `capacity` tokens that cannot take `new_tokens` more."""
    return (
        f"the static MLRACache is full (max_cache_len={capacity}) and cannot take {new_tokens} more token(s): "
        f"{FULL_CACHE_FIX}"
    )


if triton is not None:
    import triton.language as tl

    from .decode_gemv import _gemv_weight

    # a device assert's message is a compile-time constant: the numbers are left out
    _FULL_CACHE_ASSERT = tl.constexpr(f"the static MLRACache is full: {FULL_CACHE_FIX}")

    @triton.jit
    def _rotate_half(
        source, target, cos_ptr, sin_ptr, in_rows, ROPE_DIM: tl.constexpr, INTERLEAVE: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """The rope vectors at source [ROWS, 1] pointers (ROPE_DIM values each) rotated by the tables at cos_ptr /
        sin_ptr [ROWS, 1] into target [ROWS, 1], rotate-half form: their halves (the even and odd values where the
        checkpoint interleaves them, stored de-interleaved, as `apply_rotary_pos_emb` does), in float32 rounded once."""
        half = ROPE_DIM // 2
        offs_r = tl.arange(0, BLOCK_R)[None, :]
        in_half = in_rows & (offs_r < half)
        if INTERLEAVE:
            first = tl.load(source + 2 * offs_r, mask=in_half, other=0.0).to(tl.float32)
            second = tl.load(source + 2 * offs_r + 1, mask=in_half, other=0.0).to(tl.float32)
        else:
            first = tl.load(source + offs_r, mask=in_half, other=0.0).to(tl.float32)
            second = tl.load(source + half + offs_r, mask=in_half, other=0.0).to(tl.float32)
        cos_first = tl.load(cos_ptr + offs_r, mask=in_half, other=0.0).to(tl.float32)
        cos_second = tl.load(cos_ptr + half + offs_r, mask=in_half, other=0.0).to(tl.float32)
        sin_first = tl.load(sin_ptr + offs_r, mask=in_half, other=0.0).to(tl.float32)
        sin_second = tl.load(sin_ptr + half + offs_r, mask=in_half, other=0.0).to(tl.float32)
        dtype = target.dtype.element_ty
        tl.store(target + offs_r, (first * cos_first - second * sin_first).to(dtype), mask=in_half)
        tl.store(target + half + offs_r, (second * cos_second + first * sin_second).to(dtype), mask=in_half)

    @triton.jit
    def _write_latent_rows_kernel(
        projected_ptr, norm_ptr, cos_ptr, sin_ptr, rows_ptr, length_ptr, query_ptr, rotated_ptr, eps, scale, capacity,
        stride_pn, stride_pt, stride_cn, stride_ct, stride_rn, stride_rs, stride_qn, stride_qt, stride_qh,
        fold_x_ptr, fold_w_ptr, fold_out_ptr, fold_outputs, fold_reduction, fold_tiles,
        stride_fxg, stride_fxm, stride_fxk, stride_fwg, stride_fwn, stride_fwk, stride_fog, stride_fom, stride_fon,
        NUM_ROWS: tl.constexpr, NEW_TOKENS: tl.constexpr, HEADS: tl.constexpr,
        GROUPS: tl.constexpr, GROUP_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, INTERLEAVE: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_H: tl.constexpr,
        FOLD: tl.constexpr = False, FOLD_ALIGN_XM: tl.constexpr = 1, FOLD_ALIGN_WN: tl.constexpr = 1,
        FOLD_ALIGN_WK: tl.constexpr = 1, FOLD_ONE_STEP: tl.constexpr = True, FOLD_BLOCK_M: tl.constexpr = 1,
        FOLD_BLOCK_N: tl.constexpr = 1, FOLD_BLOCK_K: tl.constexpr = 1, FOLD_PRECISION: tl.constexpr = "ieee",
    ):
        row = tl.program_id(0) - 1
        if FOLD and row >= NUM_ROWS:  # programs after them: one GEMV tile of W_UK for one (branch, head) each
            fold = row - NUM_ROWS
            g, tile = fold // fold_tiles, fold % fold_tiles
            offs_m = tl.arange(0, FOLD_BLOCK_M)
            offs_n = tile * FOLD_BLOCK_N + tl.arange(0, FOLD_BLOCK_N)
            m_ok, n_ok = offs_m < NUM_ROWS, offs_n < fold_outputs
            w_ptr = fold_w_ptr + g * stride_fwg
            absorbed = _gemv_weight(
                fold_x_ptr + (g % HEADS) * stride_fxg, w_ptr, w_ptr, offs_m, offs_n, m_ok, n_ok, NUM_ROWS,
                fold_reduction, 0, stride_fxm, stride_fxk, 0, stride_fwn, stride_fwk, FOLD_ALIGN_XM, FOLD_ALIGN_WN,
                FOLD_ALIGN_WK, False, 1, FOLD_ONE_STEP, FOLD_BLOCK_M, FOLD_BLOCK_N, FOLD_BLOCK_K, FOLD_PRECISION,
            )
            out_ptrs = fold_out_ptr + g * stride_fog + offs_m[:, None] * stride_fom + offs_n[None, :] * stride_fon
            tl.store(out_ptrs, absorbed.to(fold_out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
            return
        if row >= 0:  # programs 1 to NUM_ROWS: the query's rope heads of new token t of sequence n
            n, t = row // NEW_TOKENS, row % NEW_TOKENS
            offs_h = tl.arange(0, BLOCK_H)[:, None]
            in_heads = offs_h < HEADS
            source = query_ptr + n * stride_qn + t * stride_qt + offs_h * stride_qh
            target = rotated_ptr + (row * HEADS + offs_h) * ROPE_DIM
            tables = n * stride_cn + t * stride_ct
            _rotate_half(source, target, cos_ptr + tables, sin_ptr + tables, in_heads, ROPE_DIM, INTERLEAVE, BLOCK_R)
            return
        # program 0: the cache's rows and length
        length = tl.load(length_ptr)
        fits = length + NEW_TOKENS <= capacity
        tl.device_assert(fits, _FULL_CACHE_ASSERT)
        # row i of the tile is new token t of sequence n; none is stored where they do not fit
        offs_i = tl.arange(0, BLOCK_ROWS)
        n, t = offs_i // NEW_TOKENS, offs_i % NEW_TOKENS
        in_rows = offs_i < tl.where(fits, NUM_ROWS, 0)
        source = projected_ptr + n * stride_pn + t * stride_pt  # [BLOCK_ROWS]
        target = rows_ptr + n * stride_rn + (length + t) * stride_rs
        dtype = rows_ptr.dtype.element_ty

        # the latent [BLOCK_ROWS, BLOCK_G, BLOCK_D]: an RMSNorm over each of GROUPS slices of GROUP_DIM values, times
        # its weight and the scale
        offs_g = tl.arange(0, BLOCK_G)[None, :, None]
        offs_d = tl.arange(0, BLOCK_D)[None, None, :]
        columns = offs_g * GROUP_DIM + offs_d
        in_latent = (offs_g < GROUPS) & (offs_d < GROUP_DIM)
        in_tile = in_rows[:, None, None] & in_latent
        x = tl.load(source[:, None, None] + columns, mask=in_tile, other=0.0).to(tl.float32)
        variance = tl.sum(x * x, axis=2) / GROUP_DIM
        normalized = (x * tl.rsqrt(variance + eps)[:, :, None]).to(dtype)
        weight = tl.load(norm_ptr + columns, mask=in_latent, other=0.0)
        latent = (weight.to(tl.float32) * normalized.to(tl.float32)).to(dtype)
        latent = (latent.to(tl.float32) * scale).to(dtype)
        tl.store(target[:, None, None] + columns, latent, mask=in_tile)

        # the rope key [BLOCK_ROWS, BLOCK_R]
        tables = (n * stride_cn + t * stride_ct)[:, None]
        _rotate_half(
            (source + GROUPS * GROUP_DIM)[:, None], (target + GROUPS * GROUP_DIM)[:, None], cos_ptr + tables,
            sin_ptr + tables, in_rows[:, None], ROPE_DIM, INTERLEAVE, BLOCK_R,
        )

        # every thread has read the length before it changes
        tl.debug_barrier()
        tl.store(length_ptr, length + NEW_TOKENS, mask=fits)

    @torch.library.custom_op("mlra::write_latent_rows", mutates_args=("buffer", "length"))
    def _write_latent_rows_op(
        buffer: torch.Tensor, length: torch.Tensor, projected: torch.Tensor, norm_weight: torch.Tensor, eps: float,
        groups: int, scale: float, cos: torch.Tensor, sin: torch.Tensor, interleave: bool, query_rope: torch.Tensor,
    ) -> torch.Tensor:
        (rotated,) = _write_latent_rows(
            buffer, length, projected, norm_weight, eps, groups, scale, cos, sin, interleave, query_rope, None
        )
        return rotated

    @_write_latent_rows_op.register_fake
    def _(buffer, length, projected, norm_weight, eps, groups, scale, cos, sin, interleave, query_rope):
        return query_rope.new_empty(query_rope.shape)

    @torch.library.custom_op("mlra::write_latent_rows_and_fold", mutates_args=("buffer", "length"))
    def _write_latent_rows_and_fold_op(
        buffer: torch.Tensor, length: torch.Tensor, projected: torch.Tensor, norm_weight: torch.Tensor, eps: float,
        groups: int, scale: float, cos: torch.Tensor, sin: torch.Tensor, interleave: bool, query_rope: torch.Tensor,
        fold_query: torch.Tensor, fold_weight: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _write_latent_rows(
            buffer, length, projected, norm_weight, eps, groups, scale, cos, sin, interleave, query_rope,
            (fold_query, fold_weight),
        )

    @_write_latent_rows_and_fold_op.register_fake
    def _(buffer, length, projected, norm_weight, eps, groups, scale, cos, sin, interleave, query_rope, fold_query,
          fold_weight):  # fmt: skip
        absorbed = fold_query.new_empty(fold_weight.shape[0], fold_query.shape[2], fold_weight.shape[2])
        return query_rope.new_empty(query_rope.shape), absorbed


def _write_latent_rows(
    buffer, length, projected, norm_weight, eps, groups, scale, cos, sin, interleave, query_rope, fold
) -> tuple[torch.Tensor, ...]:
    new_tokens, capacity = projected.shape[1], buffer.shape[1]
    # on the CPU reading the length costs nothing, and the interpreter skips the kernel's device assert
    if length.device.type == "cpu" and int(length) + new_tokens > capacity:
        raise ValueError(full_cache_message(capacity, new_tokens))
    return _launch_write(
        buffer, length, projected, norm_weight, eps, groups, scale, cos, sin, interleave, query_rope, fold
    )


def _launch_write(
    buffer, length, projected, norm_weight, eps, groups, scale, cos, sin, interleave, query_rope, fold
) -> tuple[torch.Tensor, ...]:
    bsz, new_tokens, width = projected.shape
    heads = query_rope.shape[2]
    latent_dim = norm_weight.shape[0]
    rope_dim = width - latent_dim
    cos, sin = cos.expand(bsz, new_tokens, rope_dim), sin.expand(bsz, new_tokens, rope_dim)
    group_dim = latent_dim // groups
    block_rows, block_g, block_d = (triton.next_power_of_2(size) for size in (bsz * new_tokens, groups, group_dim))
    latent_tile = block_rows * block_g * block_d
    # at most 32 to 64 float32 values of the latent tile per thread
    num_warps = 1 if latent_tile < 256 else 4 if latent_tile < 8192 else 8
    rotated = torch.empty(bsz, new_tokens, heads, rope_dim, dtype=query_rope.dtype, device=query_rope.device)
    outputs = (rotated,)
    if fold is not None:  # [h, 1, bsz * T, d_n] and [B * h, 1, d_l, d_n] -> [B * h, bsz * T, d_l]
        x, w = fold
        fold_batches, _, fold_outputs, fold_reduction = w.shape
        config = gemv_config(bsz * new_tokens, fold_outputs, fold_reduction, fold_batches, SINGLE, _num_sms(
            x.device.index or 0))  # fmt: skip
        absorbed = x.new_empty(fold_batches, bsz * new_tokens, fold_outputs)
        outputs += (absorbed,)
        fold_tiles = triton.cdiv(fold_outputs, config["BLOCK_N"])
        fold_arguments = (
            x, w, absorbed, fold_outputs, fold_reduction, fold_tiles, x.stride(0), x.stride(2), x.stride(3),
            w.stride(0), w.stride(2), w.stride(3), *absorbed.stride(),
        )
        fold_constants = {f"FOLD_{name}": value for name, value in tile_constants(x, w, config).items()}
        fold_constants["FOLD"] = True
        num_warps = max(num_warps, config["num_warps"])
    else:  # the fold's arguments unread (its constants keep their defaults: FOLD off)
        fold_batches = fold_tiles = 0
        fold_arguments, fold_constants = (rotated,) * 3 + (0,) * 12, {}
    # program 0 writes the cache's rows and length, programs 1 to bsz x T rotate the query's heads of one new token,
    # the rest fold W_UK into its no-rope heads
    _write_latent_rows_kernel[(1 + bsz * new_tokens + fold_batches * fold_tiles,)](
        projected, norm_weight, cos, sin, buffer, length, query_rope, rotated, eps, scale, buffer.shape[1],
        projected.stride(0), projected.stride(1), cos.stride(0), cos.stride(1), buffer.stride(0), buffer.stride(1),
        query_rope.stride(0), query_rope.stride(1), query_rope.stride(2), *fold_arguments,
        NUM_ROWS=bsz * new_tokens, NEW_TOKENS=new_tokens, HEADS=heads,
        GROUPS=groups, GROUP_DIM=group_dim, ROPE_DIM=rope_dim, INTERLEAVE=interleave,
        BLOCK_ROWS=block_rows, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_R=triton.next_power_of_2(max(rope_dim // 2, 1)),
        BLOCK_H=triton.next_power_of_2(heads), **fold_constants, num_warps=num_warps,
        # the capacity's device assert compiled in (as inductor compiles its kernels that assert), without the
        # overflow checks debug adds to integer arithmetic (inductor turns them off too)
        debug=True, sanitize_overflow=False,
    )
    return outputs


def write_latent_rows(
    buffer: torch.Tensor, length: torch.Tensor, projected: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    groups: int, scale: float, cos: torch.Tensor, sin: torch.Tensor, interleave: bool, query_rope: torch.Tensor,
    fold: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Write rows [n, L + t] of buffer [rows >= bsz, capacity, d_c + d_r] (the model's dtype) from projected
    [bsz, T, d_c + d_r] (latent then rope key; bsz x T <= MAX_ROWS), then advance length (a 0-d int64 tensor on the
    buffer's device, L, read and written by the kernel: no host synchronisation) to L + T. The latent goes through an
    RMSNorm of `groups` slices (norm_weight [d_c], eps) times `scale`, the rope key is rotated by cos/sin
    [bsz or 1, T, d_r] (rotate-half tables; `interleave`: the key's values come in pairs and are stored
    de-interleaved). Where L + T exceeds the capacity nothing is written, the length stays, and it fails: on the CPU
    a ValueError (`full_cache_message`), on a GPU a device assert.

    The same launch rotates the query's rope heads query_rope [bsz, T, h, d_r] (any strides but a unit last one: a
    view of the query projection's output) by the same tables and returns them [bsz, T, h, d_r] (contiguous), as
    `apply_rotary_pos_emb` gives them (in float32 rounded once); and, given `fold` = (x [h, 1, bsz * T, d_n], W_UK
    [B * h, 1, d_l, d_n], views of any strides), the absorbed query [B * h, bsz * T, d_l], out[g] = x[g % h] @
    W_UK[g]^T (what `decode_gemv.mlra_gemv(x, W_UK)` gives, in its tiles), else None."""
    bsz, new_tokens, width = projected.shape
    if bsz * new_tokens > MAX_ROWS:
        raise ValueError(f"write_latent_rows takes at most {MAX_ROWS} rows (bsz x T), got {bsz} x {new_tokens}")
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
    heads = query_rope.shape[2]
    if query_rope.shape[:2] != (bsz, new_tokens) or query_rope.shape[3] != width - norm_weight.shape[0]:
        raise ValueError(
            f"write_latent_rows needs query_rope [{bsz}, {new_tokens}, heads, {width - norm_weight.shape[0]}], got "
            f"{tuple(query_rope.shape)}"
        )
    if fold is not None and (
        fold[0].shape[:3] != (heads, 1, bsz * new_tokens)
        or fold[1].shape[0] % heads
        or fold[1].shape[1] != 1
        or fold[1].shape[3] != fold[0].shape[3]
        or fold[0].dtype != fold[1].dtype
    ):
        raise ValueError(
            f"write_latent_rows' fold needs x [{heads}, 1, {bsz * new_tokens}, d_n] and W_UK [B * {heads}, 1, d_l, "
            f"d_n] of one dtype, got {tuple(fold[0].shape)} and {tuple(fold[1].shape)}"
        )
    projected = projected.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()  # the kernel reads each table's last axis with unit stride
    if query_rope.stride(3) != 1:
        query_rope = query_rope.contiguous()
    arguments = (buffer, length, projected, norm_weight, eps, groups, scale, cos, sin, interleave, query_rope)
    if not torch.compiler.is_compiling():
        outputs = _write_latent_rows(*arguments, fold)
    elif fold is None:
        outputs = (_write_latent_rows_op(*arguments),)
    else:
        outputs = _write_latent_rows_and_fold_op(*arguments, *fold)
    return outputs[0], (outputs[1] if fold is not None else None)


__all__ = ["MAX_ROWS", "full_cache_message", "triton_available", "write_latent_rows"]
