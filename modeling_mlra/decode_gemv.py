"""Triton GEMV for the projections of a decode step: at most 16 rows of activations against a weight read once.

A decode step of one sequence multiplies one row by every weight matrix of the model: the time is that of reading
the weights, and cuBLAS reads them at about 0.6 of the copy rate there (split-K kernels plus their reductions,
benchmarks/results/decode_step_h200.md). This kernel reads each weight tile once with 16-byte loads, spread over
enough programs to fill the GPU without splitting the reduction, and accumulates in float32:

    out[g, m, n] = sum_s sum_k x[g % Gx, s, m, k] * w[g, s, n, k]

for every batch index g of the weight (the W_UK fold: one per branch and head), segment s (W_UV: the softmax
branches summed) and output row n. One launch may also read two weights that share the input: their outputs
side by side (q_a_proj with kv_a_proj_with_mqa) or combined as SwiGLU, silu(x W_gate^T) * (x W_up^T) (gate_proj
with up_proj), so the projections that read the same activations are one kernel without a fused copy of their
weights: the checkpoint's parameters are read where they are.

One row (batch 1): each program sums the products of a [BLOCK_K, BLOCK_N] weight tile with the row. Up to 16 rows:
the rows are padded to 16 and the tiles go through `tl.dot`. The same launch can also do the small work around the
product, so that a decode step is few kernels: an RMSNorm of x before it, a scale and a residual add after it. On
Hopper a one-row launch is a programmatic dependent launch: its weights start coming into L2 while the kernel
before it finishes (`_gemv_kernel`). `mlra_gemv` is a torch custom op with a fake
implementation, so torch.compile(fullgraph=True) and CUDA graphs capture it; the model calls it through
`gemv_linears` (docs/design.md, "Decode projections").
"""

import functools

import torch
from torch import nn

from .mlra_decode_kernel import _num_sms, triton, triton_available

if triton is not None:
    import triton.language as tl

PREFETCH_BYTES = 8192  # weight bytes per program asked into L2 before the kernel before it has finished
MAX_ROWS = 16  # rows of activations the kernel takes (batch x new tokens); larger GEMMs are cuBLAS's
SINGLE, SIDE_BY_SIDE, SWIGLU = 0, 1, 2  # how a launch combines its weights


@functools.cache
def gemv_config(
    rows: int, outputs: int, reduction: int, batches: int, mode: int, num_sms: int, segments: int = 1, **choices
) -> dict:
    """Tiles and warps from the shapes only (CUDA-graph safe); `choices` overrides any value (benchmarks/gemv.py),
    `pdl` included (whether the launch is a programmatic dependent one; None: one row where the GPU has it) and
    `prefetch_bytes` (the weight bytes per program asked into L2 before a programmatic launch waits, PREFETCH_BYTES)
    and `preload` (a programmatic launch loads its first weight tile before it waits, in place of that prefetch) and
    `lookahead` (one row: each step of the loop loads the next step's weight tile before it multiplies its own).

    One row: the weight tile [BLOCK_K, BLOCK_N] is multiplied by the row and summed once after the loop; the tile
    holds 2K-8K values per weight (at least two 16-byte loads per thread per step, at most 64 float32 products per
    thread and weight), as few output rows as keep about 4 programs per multiprocessor streaming (within 8% of the
    best tiles of the H200 sweep at every shape, benchmarks/results/gemv_h200.md); where the reduction is one step,
    the segments' tiles are loaded together and count as one (W_UV: 4 branches x 4 rows x 128). More rows: tiles of
    16 rows x BLOCK_N x 128 through tl.dot, software-pipelined; SwiGLU's two weights in 32-wide tiles (the sweep's
    best for gate_proj with up_proj: 0.83 of the copy rate, against 0.73 in 16-wide ones).

    One-row launches of one weight (not batched) with a reduction of 1K values or more (q_b_proj, o_proj, down_proj,
    the lm_head) take tiles of 4 rows x 1024 values in 4 warps, and where the loop is long (a reduction of 8K or more:
    down_proj) load the next weight tile ahead (`lookahead`): in the compiled 1 x 16 step of session 7 (H200,
    benchmarks/results/decode_step_h200_s7_picks.md) the GEMV's kernel time fell from 1947 to 1832 us with these four,
    down_proj's the most (1872 us with it alone; 1884 without the lookahead). Lookahead elsewhere was slower in the
    step (gate + up 2114 us; all one-row launches: 2.39 against 2.14 ms, decode_step_h200_s7_lookahead.md).

    Small one-row launches of two weights side by side, with a reduction of 2K-4K values and at most 4096 outputs
    (q_a_proj with kv_a_proj_with_mqa), take tiles of 8 rows x 1024 values in 8 warps (the H200 sweep's best,
    benchmarks/results/gemv_h200_fused_pdl.md, gemv_h200.md), with rows of 4 where 8 would leave fewer than 2
    programs per multiprocessor (1600 outputs: 5.1 against 5.7 and 5.2 against 6.3 us in two calls of session 6,
    gemv_h200_prefetch.md, gemv_h200_preload.md).

    A programmatic launch loads its first weight tile before it waits for the kernel before it (`preload`, in place of
    asking its first 8 KB into L2): in one call (gemv_h200_preload.md) q_a + kv_a 5.8 against 6.3 us, q_b 4.4 against
    5.2, o 6.3 against 6.9, W_UK 6.4 against 7.7, lm_head 76.3 against 78.3, the others equal.
    """
    small = rows == 1 and mode != SWIGLU and 2048 < reduction <= 4096 and outputs * batches <= 4096
    if rows == 1 and mode == SINGLE and batches == 1 and reduction >= 1024:
        choices = {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "lookahead": reduction >= 8192, **choices}
    elif small:
        rows_per_program = 8 if triton.cdiv(outputs, 8) * batches >= 2 * num_sms else 4
        choices = {"BLOCK_N": rows_per_program, "BLOCK_K": 1024, "num_warps": 8, **choices}
    num_warps = choices.get("num_warps", 4)
    wanted = choices.get("programs_per_sm", 4) * num_sms
    weights = 2 if mode == SWIGLU else 1
    if rows == 1:
        block_k = choices.get("BLOCK_K") or min(512, max(16, triton.next_power_of_2(reduction)))
        largest = 64 * 32 * num_warps // weights  # float32 products per program
        loaded = block_k * (segments if reduction == block_k else 1)  # values per output row loaded at once
        widths = [w for w in (32, 16, 8, 4, 2, 1) if w * block_k <= largest]
        widths = [w for w in widths if w * loaded >= 512 * num_warps // weights] or widths[:1]
    else:
        block_k = choices.get("BLOCK_K") or min(128, max(16, triton.next_power_of_2(reduction)))
        widths = [32] if mode == SWIGLU else [64, 32, 16]
    block_n = choices.get("BLOCK_N") or next(
        (w for w in widths if triton.cdiv(outputs, w) * batches >= wanted), widths[-1]
    )
    return dict(
        BLOCK_M=1 if rows == 1 else 16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        num_stages=choices.get("num_stages", 1 if rows == 1 else 3), pdl=choices.get("pdl"),
        prefetch_bytes=choices.get("prefetch_bytes", PREFETCH_BYTES), preload=choices.get("preload", True),
        lookahead=choices.get("lookahead", False),
    )


def _alignment(stride: int, element_size: int) -> int:
    """The largest power of two, up to 16 bytes' worth of elements, that divides `stride` (1 for a unit stride:
    the contiguous axis needs no hint)."""
    if stride == 1:
        return 1
    align = 16 // element_size
    while stride % align:
        align //= 2
    return align


if triton is not None:

    @triton.jit
    def _weight_tile(w_ptrs, n_ok, k_ok, MASK_K: tl.constexpr):
        """The weight tile [BLOCK_K, BLOCK_N] at w_ptrs, zero outside the rows n_ok (and, MASK_K, the columns k_ok)."""
        if MASK_K:
            return tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        return tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)

    @triton.jit
    def _gemv_product(
        acc, w, x_ptrs, norm_ptrs, m_ok, k_ok,
        BLOCK_M: tl.constexpr, MASK_K: tl.constexpr, NORM: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """acc [BLOCK_M, BLOCK_N] += x tile [BLOCK_M, BLOCK_K] @ the weight tile w [BLOCK_K, BLOCK_N]; one row: acc
        [BLOCK_K, BLOCK_N] += the products. NORM: x times the norm's weight (its rms divides the sums later)."""
        if MASK_K:
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        if NORM:
            if MASK_K:
                norm_weight = tl.load(norm_ptrs, mask=k_ok, other=0.0)
            else:
                norm_weight = tl.load(norm_ptrs)
            weighted = x.to(tl.float32) * norm_weight.to(tl.float32)[None, :]
            x = weighted if BLOCK_M == 1 else weighted.to(x.dtype)  # tl.dot's operands stay in x's dtype
        if BLOCK_M == 1:  # products kept per k, summed once after the loop
            acc += tl.trans(x.to(tl.float32)) * w.to(tl.float32)
        else:
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _gemv_tile(
        acc, x_ptrs, w_ptrs, norm_ptrs, m_ok, n_ok, k_ok,
        BLOCK_M: tl.constexpr, MASK_K: tl.constexpr, NORM: tl.constexpr, PRECISION: tl.constexpr,
        WAIT: tl.constexpr = False,
    ):
        """`_gemv_product` of the weight tile at w_ptrs. WAIT: the weight tile is asked for first, then the kernel
        before this one is waited for (PDL), then x is read."""
        w = _weight_tile(w_ptrs, n_ok, k_ok, MASK_K)
        if WAIT:
            tl.extra.cuda.gdc_wait()
        return _gemv_product(acc, w, x_ptrs, norm_ptrs, m_ok, k_ok, BLOCK_M, MASK_K, NORM, PRECISION)

    @triton.jit
    def _gemv_weight(
        x_ptr, w_ptr, norm_ptr, offs_m, offs_n, m_ok, n_ok, M, K,
        stride_xs, stride_xm, stride_xk, stride_ws, stride_wn, stride_wk,
        ALIGN_XM: tl.constexpr, ALIGN_WN: tl.constexpr, ALIGN_WK: tl.constexpr, NORM: tl.constexpr,
        SEGMENTS: tl.constexpr, ONE_STEP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
        PRELOAD: tl.constexpr = False, LOOKAHEAD: tl.constexpr = False,
    ):
        """One weight's tile of outputs [BLOCK_M, BLOCK_N] in float32, over every segment and the whole reduction:
        whole BLOCK_K steps unmasked along k (so the loads stay 16 bytes wide), then the remainder masked; ONE_STEP
        (K == BLOCK_K): every segment's tile in straight-line code, so that their loads are in flight together. NORM
        (one segment): of x times the norm's weight at norm_ptr (the caller divides by the rms, `_rms_reciprocal`).
        PRELOAD (a programmatic dependent launch): the first weight tile is asked for before the kernel before this
        one is waited for (the later segments' waits return at once), the rest after. LOOKAHEAD: each whole step
        asks for the next step's weight tile before it multiplies its own (two tiles in flight per program, where
        the loop alone keeps one: Triton pipelines only the loads that feed tl.dot); with PRELOAD the second tile
        is asked for before the wait too."""
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = tl.multiple_of(offs_m * stride_xm, ALIGN_XM)
        w_rows = tl.multiple_of(offs_n * stride_wn, ALIGN_WN)
        w_cols = tl.multiple_of(offs_k * stride_wk, ALIGN_WK)
        acc = tl.zeros((BLOCK_K if BLOCK_M == 1 else BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_whole = (K // BLOCK_K) * BLOCK_K
        if ONE_STEP:
            for s in tl.static_range(SEGMENTS):
                x_ptrs = x_ptr + s * stride_xs + x_rows[:, None] + offs_k[None, :] * stride_xk
                w_ptrs = w_ptr + s * stride_ws + w_cols[:, None] + w_rows[None, :]
                acc = _gemv_tile(
                    acc, x_ptrs, w_ptrs, norm_ptr + offs_k, m_ok, n_ok, offs_k, BLOCK_M, False, NORM, PRECISION,
                    PRELOAD,
                )
        for s in range(0 if ONE_STEP else SEGMENTS):
            x_ptrs = x_ptr + s * stride_xs + x_rows[:, None] + offs_k[None, :] * stride_xk
            w_ptrs = w_ptr + s * stride_ws + w_cols[:, None] + w_rows[None, :]
            norm_ptrs = norm_ptr + offs_k
            first = 0
            if PRELOAD:  # the first tile, masked where K < BLOCK_K
                w_first = _weight_tile(w_ptrs, n_ok, offs_k < K, True)
                first = BLOCK_K
            if LOOKAHEAD:
                steps = (k_whole - first) // BLOCK_K  # whole steps after the preloaded tile
                w_next = _weight_tile(w_ptrs + first * stride_wk, tl.where(steps > 0, n_ok, False), offs_k, False)
            if PRELOAD:
                tl.extra.cuda.gdc_wait()
                acc = _gemv_product(acc, w_first, x_ptrs, norm_ptrs, m_ok, offs_k < K, BLOCK_M, True, NORM, PRECISION)
                x_ptrs += BLOCK_K * stride_xk
                w_ptrs += BLOCK_K * stride_wk
                norm_ptrs += BLOCK_K
            if LOOKAHEAD:
                for step in range(steps):
                    w = w_next
                    w_next = _weight_tile(
                        w_ptrs + BLOCK_K * stride_wk, tl.where(step + 1 < steps, n_ok, False), offs_k, False
                    )
                    acc = _gemv_product(acc, w, x_ptrs, norm_ptrs, m_ok, offs_k, BLOCK_M, False, NORM, PRECISION)
                    x_ptrs += BLOCK_K * stride_xk
                    w_ptrs += BLOCK_K * stride_wk
                    norm_ptrs += BLOCK_K
            else:
                for k in range(first, k_whole, BLOCK_K):
                    acc = _gemv_tile(
                        acc, x_ptrs, w_ptrs, norm_ptrs, m_ok, n_ok, offs_k, BLOCK_M, False, NORM, PRECISION
                    )
                    x_ptrs += BLOCK_K * stride_xk
                    w_ptrs += BLOCK_K * stride_wk
                    norm_ptrs += BLOCK_K
            if k_whole < K and k_whole >= first:
                acc = _gemv_tile(
                    acc, x_ptrs, w_ptrs, norm_ptrs, m_ok, n_ok, k_whole + offs_k < K, BLOCK_M, True, NORM, PRECISION
                )
        if BLOCK_M == 1:
            out = tl.sum(acc, axis=0)[None, :]
        else:
            out = acc
        return out

    @triton.jit
    def _rms_reciprocal(x_ptr, offs_m, m_ok, K, eps, stride_xm, stride_xk, BLOCK_M: tl.constexpr,
                        BLOCK_R: tl.constexpr):
        """1 / sqrt(mean(x^2) + eps) of each row of x [M, K] -> [BLOCK_M], in a layout of its own (each value loaded
        once per program: after the products, x is in the caches)."""
        offs_r = tl.arange(0, BLOCK_R)
        squares = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k in range(0, K, BLOCK_R):
            ptrs = x_ptr + offs_m[:, None] * stride_xm + (k + offs_r)[None, :] * stride_xk
            x = tl.load(ptrs, mask=m_ok[:, None] & (k + offs_r < K)[None, :], other=0.0).to(tl.float32)
            squares += x * x
        return tl.rsqrt(tl.sum(squares, axis=1) / K + eps)

    @triton.jit
    def _prefetch_to_l2(ptrs):
        """Ask for the lines at `ptrs` to be brought into L2 (no registers written, nothing waited for)."""
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
        )

    @triton.jit
    def _prefetch_tile(w_ptr, offs_n, n_ok, K, stride_wn, stride_wk, K_CONTIGUOUS: tl.constexpr,
                       PREFETCH_K: tl.constexpr):
        """The first PREFETCH_K columns of the program's weight rows into L2, one request per 128 bytes."""
        ks = tl.arange(0, PREFETCH_K // 64 if K_CONTIGUOUS else PREFETCH_K)
        if K_CONTIGUOUS:  # one request per 64 values of each row
            ptrs = w_ptr + ks[:, None] * 64 + offs_n[None, :] * stride_wn
            ok = (ks * 64 < K)[:, None] & n_ok[None, :]
        else:  # the rows side by side in memory: one request per column, from the first row
            ptrs = w_ptr + ks * stride_wk + tl.min(offs_n) * stride_wn
            ok = ks < K
        _prefetch_to_l2(tl.where(ok, ptrs, w_ptr))

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, w2_ptr, out_ptr, norm_ptr, residual_ptr,
        M, N, N2, K, x_batches, eps, scale,
        stride_xg, stride_xs, stride_xm, stride_xk,
        stride_wg, stride_ws, stride_wn, stride_wk,
        stride_og, stride_om, stride_on,
        stride_rg, stride_rm, stride_rn,
        MODE: tl.constexpr, ALIGN_XM: tl.constexpr, ALIGN_WN: tl.constexpr, ALIGN_WK: tl.constexpr,
        SEGMENTS: tl.constexpr, ONE_STEP: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
        PDL: tl.constexpr, PRELOAD: tl.constexpr, LOOKAHEAD: tl.constexpr, W_K_CONTIGUOUS: tl.constexpr,
        PREFETCH_K: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # program -> (tile of outputs, weight batch); SIDE_BY_SIDE: the first weight's tiles, then the second's
        tile = tl.program_id(0)
        g = tl.program_id(1)
        x_ptr += (g % x_batches) * stride_xg
        w_ptr += g * stride_wg
        w2_ptr += g * stride_wg
        out_ptr += g * stride_og
        residual_ptr += g * stride_rg
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        first_tiles = tl.cdiv(N, BLOCK_N)
        weight, rows, column = w_ptr, N, N * 0
        if MODE == 1:
            if tile >= first_tiles:
                weight, rows, column, tile = w2_ptr, N2, N, tile - first_tiles
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < rows
        if PDL:
            # Launched as a programmatic dependent launch: the kernel after this one may start once every program
            # here has; the weights (which no kernel writes) start coming into L2 while the kernel before this one
            # finishes, and the activations are read only after it has (gdc_wait). PRELOAD: the first weight tile is
            # loaded (into registers, not only into L2) before that wait, inside `_gemv_weight`.
            tl.extra.cuda.gdc_launch_dependents()
            if not PRELOAD:
                _prefetch_tile(weight, offs_n, n_ok, K, stride_wn, stride_wk, W_K_CONTIGUOUS, PREFETCH_K)
            if MODE == 2:
                _prefetch_tile(w2_ptr, offs_n, n_ok, K, stride_wn, stride_wk, W_K_CONTIGUOUS, PREFETCH_K)
            if not PRELOAD:
                tl.extra.cuda.gdc_wait()
        acc = _gemv_weight(
            x_ptr, weight, norm_ptr, offs_m, offs_n, m_ok, n_ok, M, K, stride_xs, stride_xm, stride_xk, stride_ws,
            stride_wn, stride_wk, ALIGN_XM, ALIGN_WN, ALIGN_WK, NORM, SEGMENTS, ONE_STEP, BLOCK_M, BLOCK_N, BLOCK_K,
            PRECISION, PRELOAD, LOOKAHEAD,
        )
        if MODE == 2:  # up rows from the second weight
            up = _gemv_weight(
                x_ptr, w2_ptr, norm_ptr, offs_m, offs_n, m_ok, n_ok, M, K, stride_xs, stride_xm, stride_xk,
                stride_ws, stride_wn, stride_wk, ALIGN_XM, ALIGN_WN, ALIGN_WK, NORM, SEGMENTS, ONE_STEP, BLOCK_M,
                BLOCK_N, BLOCK_K, PRECISION, False, LOOKAHEAD,
            )
        if NORM:  # RMSNorm's division, once per output
            rms_reciprocal = _rms_reciprocal(x_ptr, offs_m, m_ok, K, eps, stride_xm, stride_xk, BLOCK_M, BLOCK_R)
            acc = acc * rms_reciprocal[:, None]
            if MODE == 2:
                up = up * rms_reciprocal[:, None]
        if MODE == 2:  # silu(gate) * up
            acc = acc * tl.sigmoid(acc) * up
        acc = acc * scale
        mask = m_ok[:, None] & n_ok[None, :]
        if RESIDUAL:
            residual_ptrs = residual_ptr + offs_m[:, None] * stride_rm + (column + offs_n)[None, :] * stride_rn
            acc += tl.load(residual_ptrs, mask=mask, other=0.0).to(tl.float32)
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + (column + offs_n)[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def programmatic_launch(device_index: int) -> bool:
    """Whether the GEMV launches as a programmatic dependent launch (PDL: Hopper and later, a Triton that has it):
    its weights then start coming in while the kernel before it finishes (`_gemv_kernel`)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability(device_index)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        return "launch_pdl" in CUDAOptions.__dataclass_fields__ and hasattr(tl.extra.cuda, "gdc_launch_dependents")
    except (ImportError, AttributeError):  # a Triton without them
        return False


def _gemv(
    x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None, mode: int, norm_weight: torch.Tensor | None = None,
    eps: float = 0.0, scale: float = 1.0, residual: torch.Tensor | None = None, **choices,
) -> torch.Tensor:
    """x [Gx, S, M, K], w (and w2) [G, S, N, K], any strides -> out [G, M, N] (SIDE_BY_SIDE: [G, M, N + N2]); see
    `mlra_gemv`."""
    batches, segments, rows_out, reduction = w.shape
    x_batches, _, rows, _ = x.shape
    second_rows = w2.shape[2] if w2 is not None else 0
    outputs = rows_out + second_rows if mode == SIDE_BY_SIDE else rows_out
    out = x.new_empty(batches, rows, outputs)
    config = gemv_config(
        rows, outputs, reduction, batches, mode, _num_sms(x.device.index or 0), segments=segments, **choices
    )
    block_n = config["BLOCK_N"]
    tiles = triton.cdiv(rows_out, block_n) + (triton.cdiv(second_rows, block_n) if mode == SIDE_BY_SIDE else 0)
    # PDL measured at one row (the 1 x 16 step, benchmarks/results/decode_step_h200_1x16_pdl.md); not yet at more
    pdl = config["pdl"]
    if pdl is None:
        pdl = rows == 1 and x.is_cuda and programmatic_launch(x.device.index or 0)
    size = w.element_size()
    # the columns of its weight rows a program asks into L2 ahead: about `prefetch_bytes`, a power of two >= 64
    columns = max(1, config["prefetch_bytes"] // (block_n * size * (2 if mode == SWIGLU else 1)))
    prefetch_k = max(64, min(triton.next_power_of_2(reduction), 1 << (columns.bit_length() - 1)))
    residual_strides = residual.stride() if residual is not None else (0, 0, 0)
    _gemv_kernel[(tiles, batches)](
        x, w, w2 if w2 is not None else w, out, norm_weight if norm_weight is not None else w,
        residual if residual is not None else out,
        rows, rows_out, second_rows, reduction, x_batches, eps, scale,
        *x.stride(), *w.stride(), *out.stride(), *residual_strides,
        MODE=mode, SEGMENTS=segments, NORM=norm_weight is not None, RESIDUAL=residual is not None, PDL=pdl,
        PRELOAD=pdl and config["preload"], LOOKAHEAD=rows == 1 and config["lookahead"],
        W_K_CONTIGUOUS=w.stride(3) == 1,
        PREFETCH_K=prefetch_k, BLOCK_R=min(4096 // config["BLOCK_M"], triton.next_power_of_2(reduction)),
        **tile_constants(x, w, config),
        num_warps=config["num_warps"], num_stages=config["num_stages"], **({"launch_pdl": True} if pdl else {}),
    )
    return out


def tile_constants(x: torch.Tensor, w: torch.Tensor, config: dict) -> dict:
    """The compile-time constants of `_gemv_weight`'s tiles for x [Gx, S, M, K] and w [G, S, N, K] under `config`
    (`gemv_config`): the alignments of the row strides, the tile and whether the reduction is one step."""
    size = w.element_size()
    return dict(
        ALIGN_XM=_alignment(x.stride(2), size), ALIGN_WN=_alignment(w.stride(2), size),
        ALIGN_WK=_alignment(w.stride(3), size), ONE_STEP=x.shape[2] == 1 and w.shape[3] == config["BLOCK_K"],
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )


if triton is not None:

    @torch.library.custom_op("mlra::gemv", mutates_args=())
    def _gemv_op(
        x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None, mode: int, norm_weight: torch.Tensor | None,
        eps: float, scale: float, residual: torch.Tensor | None,
    ) -> torch.Tensor:
        return _gemv(x, w, w2, mode, norm_weight, eps, scale, residual)

    @_gemv_op.register_fake
    def _(x, w, w2, mode, norm_weight, eps, scale, residual):
        outputs = w.shape[2] + (w2.shape[2] if mode == SIDE_BY_SIDE else 0)
        return x.new_empty(w.shape[0], x.shape[2], outputs)


def mlra_gemv(
    x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None = None, mode: int = SINGLE,
    norm_weight: torch.Tensor | None = None, eps: float = 0.0, scale: float = 1.0, residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [G, M, N] with out[g] = sum_s x[g % Gx, s] @ w[g, s]^T: x [Gx, S, M <= 16, K], w [G, S, N, K] (views of
    any strides; G a multiple of Gx). With w2 [G, S, N2, K] (the strides of w): SIDE_BY_SIDE gives
    [G, M, N + N2], x's products with w then w2; SWIGLU (N2 == N) gives silu(x w^T) * (x w2^T).

    In the same launch: norm_weight [K] (one segment), each row of x through RMSNorm first (x / sqrt(mean(x^2) +
    eps) * norm_weight); the output times `scale`; residual (out's shape) added last."""
    if x.shape[2] > MAX_ROWS:
        raise ValueError(f"mlra_gemv takes at most {MAX_ROWS} rows, got x of shape {tuple(x.shape)}")
    if w2 is not None and (
        w2.shape[:2] + w2.shape[3:] != w.shape[:2] + w.shape[3:]
        or w2.stride()[2:] != w.stride()[2:]
        or (w.shape[:2] != (1, 1) and w2.stride()[:2] != w.stride()[:2])
    ):
        raise ValueError(
            f"mlra_gemv needs two weights of one layout, got shapes {tuple(w.shape)}, {tuple(w2.shape)} and strides "
            f"{w.stride()}, {w2.stride()}"
        )
    if norm_weight is not None and (
        norm_weight.shape != (x.shape[3],) or norm_weight.stride() != (1,) or x.shape[1] != 1
    ):
        raise ValueError(
            f"mlra_gemv's norm_weight must be one contiguous vector of x's width for one segment, got norm_weight of "
            f"shape {tuple(norm_weight.shape)} for x of shape {tuple(x.shape)}"
        )
    outputs = w.shape[2] + (w2.shape[2] if mode == SIDE_BY_SIDE else 0)
    if residual is not None and residual.shape != (w.shape[0], x.shape[2], outputs):
        raise ValueError(
            f"mlra_gemv's residual must have the output's shape {(w.shape[0], x.shape[2], outputs)}, got "
            f"{tuple(residual.shape)}"
        )
    if torch.compiler.is_compiling():
        return _gemv_op(x, w, w2, mode, norm_weight, eps, scale, residual)
    # eager: straight to the launch, without the custom op's dispatch overhead
    return _gemv(x, w, w2, mode, norm_weight, eps, scale, residual)


def needs_gradient(*tensors: torch.Tensor) -> bool:
    """Whether autograd would record a product of these tensors: the GEMV has no backward, so such products are
    left to PyTorch (training, fine-tuning)."""
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)


def reads_as_is(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether a kernel may read `module.weight` where calling the module on x would: no hooks, no replaced forward
    (accelerate's hooks replace it for offloaded weights), its weight an ordinary tensor in x's dtype and device that
    needs no gradient here."""
    weight = module.weight
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or "forward" in module.__dict__
        or type(weight) not in (nn.Parameter, torch.Tensor)
        or weight.dtype != x.dtype
        or weight.device != x.device
        or needs_gradient(weight, x)
    )


def plain_weights(linears: tuple[nn.Module, ...], x: torch.Tensor) -> list[torch.Tensor] | None:
    """The weights of `linears` where the kernel computes exactly what calling them would: plain nn.Linear modules
    (not a subclass such as a tensor-parallel or quantized layer, not wrapped by an adapter such as peft's LoRA),
    without bias, read as they are (`reads_as_is`); else None (call the modules)."""
    if all(type(linear) is nn.Linear and linear.bias is None and reads_as_is(linear, x) for linear in linears):
        return [linear.weight for linear in linears]
    return None


def gemv_linears(
    x: torch.Tensor, *linears: nn.Module, swiglu: bool = False, norm: tuple[torch.Tensor, float] | None = None,
    scale: float = 1.0, residual: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """x [..., K] through one or two nn.Linear modules that read it, in one launch: one module's output; two
    modules' outputs side by side ([..., N1 + N2]); or with swiglu, silu(gate(x)) * up(x). In the same launch: norm
    (an RMSNorm's weight [K] and eps) applied to x first, the output times `scale`, residual [..., N] added last.
    None where the kernel does not apply or is not the faster (the caller then calls the modules): more than 16
    rows, modules it cannot read (`plain_weights`), or one module and several rows, where cuBLAS's split-K GEMM reads
    the weight faster (H200, 16 rows: down_proj 22 us against 41-44, o_proj 10.5 against 12.9;
    benchmarks/results/gemv_h200.md)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    fits = rows == 1 or (1 < rows <= MAX_ROWS and len(linears) == 2)
    weights = plain_weights(linears, x) if fits else None
    if weights is None or (swiglu and weights[0].shape != weights[1].shape):
        return None
    w, w2 = weights[0][None, None], (weights[1][None, None] if len(weights) == 2 else None)
    mode = SWIGLU if swiglu else SIDE_BY_SIDE if w2 is not None else SINGLE
    norm_weight, eps = norm if norm is not None else (None, 0.0)
    if residual is not None:
        residual = residual.reshape(1, rows, residual.shape[-1])
    out = mlra_gemv(x.reshape(1, 1, rows, x.shape[-1]), w, w2, mode, norm_weight, eps, scale, residual)
    return out.view(*x.shape[:-1], out.shape[-1])


__all__ = [
    "MAX_ROWS", "gemv_linears", "mlra_gemv", "needs_gradient", "programmatic_launch", "reads_as_is", "triton_available",
]
