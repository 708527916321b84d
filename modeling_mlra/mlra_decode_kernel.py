"""Fused Triton kernel for absorbed decoding on the compressed latent cache (flash-decoding).

One call serves one layer, all heads and all softmax branches:

    z[n, t, b, i] = softmax_s((qa[n, t, b, i] . c[n, s, l] + q_rope[n, t, i] . kr[n, s]) * scaling) . c[n, s, l]

with l = b * G + g(i) the latent block that branch b of head i reads (`MLRAConfig.latent_block`). The cache row of a
token is [c_0 | c_1 | ... | c_{L-1} | kr] (width L * d_l + d_r), the layout `MLRALatentCacheLayer` keeps.

Each program owns (batch row, head group, branch or branches, tile of heads, slice of the sequence). It streams its
slice of the cache once: per block of tokens it loads the rope key, computes the rope scores once for its branches,
then loads the latent block of each and runs one online softmax per branch. A second small kernel merges the slices
by log-sum-exp. The cache may also be the fp8 cache's packed rows (`fp8_cache_layout`), dequantized in registers. The model code calls `mlra_decode_attention`, a torch custom op with a fake implementation, so
torch.compile(fullgraph=True) and CUDA graphs capture it without a graph break. See docs/design.md ("Fused decode kernel").
"""

import functools
import math
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (CPU-only installs, macOS): the PyTorch path runs
    triton = None

MAX_BRANCHES = 4  # the kernel unrolls up to four softmax branches per program (every published family member)
MAX_NEW_TOKENS = 16


def triton_available() -> bool:
    return triton is not None


class Fp8CacheLayout(NamedTuple):
    """Byte layout of one token's row in the fp8 latent cache: [L * d_l e4m3 values | L float32 scales, one per
    latent block | d_r rope key in the model's dtype], the rope key and the row's end aligned to 16 rope values.
    That alignment lets Triton prove 16-byte alignment of every view the kernel reads (fp8, float32, rope dtype), so
    that all three loads are pipelined (cp.async): with FlashMLA's 656-byte row the rope key's loads were not
    (benchmarks/compile_decode_kernel.py). 672 bytes for the published 4 x 128 + 64 and for MLA's 512 + 64 with a
    bf16 rope key, against 1152 in bf16."""

    scales_offset: int
    rope_offset: int
    row_bytes: int


def fp8_cache_layout(num_blocks: int, latent_block_dim: int, rope_dim: int, rope_dtype: torch.dtype) -> Fp8CacheLayout:
    def align(offset: int, to: int) -> int:
        return -(-offset // to) * to

    rope_alignment = 16 * rope_dtype.itemsize
    scales_offset = align(num_blocks * latent_block_dim, 4)
    rope_offset = align(scales_offset + 4 * num_blocks, rope_alignment)
    return Fp8CacheLayout(scales_offset, rope_offset, align(rope_offset + rope_dim * rope_dtype.itemsize, rope_alignment))


def kernel_supports(
    num_branches: int, latent_block_dim: int, rope_dim: int, num_new_tokens: int, dtype: torch.dtype,
    cache_dtype: torch.dtype | None = None,
) -> bool:
    """Whether `mlra_decode_attention` handles this shape and dtype (else the PyTorch absorbed path runs).
    cache_dtype: torch.float8_e4m3fn for the fp8 cache (bf16 or fp32 models: the kernel scales probabilities by the
    cache's scales, which fp16's range would cut), else None (the model's dtype)."""
    return (
        triton is not None
        and 1 <= num_branches <= MAX_BRANCHES
        and 1 <= num_new_tokens <= MAX_NEW_TOKENS
        and latent_block_dim <= 512
        and rope_dim <= 128
        and dtype in (torch.float16, torch.bfloat16, torch.float32)
        and cache_dtype in (None, dtype, torch.float8_e4m3fn)
        and not (cache_dtype == torch.float8_e4m3fn and dtype == torch.float16)
    )


@functools.cache
def _num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 8  # the interpreter: a few splits, enough to exercise the merge
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# fp32 accumulator values per thread ([query rows, d_l] per branch a program runs); beyond these ptxas spills
# registers on sm_90 (compiled offline: benchmarks/compile_decode_kernel.py)
ACCUMULATOR_VALUES_PER_THREAD = 128  # one branch per program
MULTI_BRANCH_VALUES_PER_THREAD = 64  # several branches per program: one query tile and one online softmax state each


@functools.cache
def launch_config(
    bsz: int, num_groups: int, heads_per_group: int, num_branches: int, latent_block_dim: int, rope_dim: int,
    num_new_tokens: int, capacity: int, token_bytes: int, num_sms: int, operand_bytes: int = 2, **choices,
) -> dict:
    """Tiles, warps, branches per program and sequence splits, from shapes only (no tensor values: CUDA-graph safe).

    operand_bytes: the queries' element size (4: float32). `choices` overrides a default (benchmark sweeps): num_warps, num_stages, BLOCK_N, BRANCHES_PER_PROGRAM, MIN_ROWS
    (query rows padded up to this; 64 lets Hopper's wgmma run the dots), num_splits, programs_per_sm.

    Defaults from the H200 sweep (benchmarks/results/decode_kernel_h200.md): one softmax branch per program with
    64-token blocks (the 2.9B layer 1.2-1.4x faster than two branches per program with 32-token blocks, although the
    rope key is then read once per branch: the other reads hit L2); 4 warps for latent blocks up to 128 wide, so that
    several programs share a multiprocessor; 8 warps for wider ones (MLA's 512: all 64 heads in one program, so the
    cache is read once, and the dots on wgmma), 2 stages so that the tiles fit shared memory. Several branches per
    program (a choice) fit the register budget by halving. The sequence is split until there are about
    `programs_per_sm` programs per multiprocessor, while each split reads several times more cache bytes than it
    writes partial results.
    """
    block_d = max(16, triton.next_power_of_2(latent_block_dim))
    block_t = triton.next_power_of_2(num_new_tokens)
    heads = triton.next_power_of_2(heads_per_group)
    num_warps = choices.get("num_warps", 8 if block_d >= 256 else 4)
    threads = 32 * num_warps
    branches_per_program = choices.get("BRANCHES_PER_PROGRAM", 1)
    while (
        branches_per_program > 1
        and branches_per_program * max(16, heads * block_t) * block_d > MULTI_BRANCH_VALUES_PER_THREAD * threads
    ):
        branches_per_program //= 2
    if num_branches % branches_per_program:
        branches_per_program = 1
    max_rows = max(16, ACCUMULATOR_VALUES_PER_THREAD * threads // (branches_per_program * block_d))
    if operand_bytes == 4:
        # float32 operands (exact "ieee" dots on the FMA units, every tile in float32): for sm_90, 128 query rows of a
        # published layer spilled 20 KB per thread and took 70 s to compile, 32 rows 9 KB and 12 s
        max_rows = min(max_rows, 32)
    block_h = min(heads, max(1, max_rows // block_t))
    block_m = max(choices.get("MIN_ROWS", 16), block_h * block_t)
    head_tiles = triton.cdiv(heads_per_group, block_h)
    programs = bsz * num_groups * head_tiles * (num_branches // branches_per_program)
    partial_bytes = num_new_tokens * num_branches * num_groups * heads_per_group * latent_block_dim * 4
    min_tokens = max(256, 4 * partial_bytes // token_bytes)
    programs_per_sm = choices.get("programs_per_sm", 1 if num_warps == 8 else 2)
    num_splits = choices.get("num_splits") or max(
        1, min(triton.cdiv(programs_per_sm * num_sms, programs), triton.cdiv(capacity, min_tokens), 512)
    )
    return dict(
        BLOCK_H=block_h, BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_D=block_d,
        BLOCK_N=choices.get("BLOCK_N", 64 if branches_per_program == 1 else 32),
        BRANCHES_PER_PROGRAM=branches_per_program, head_tiles=head_tiles, num_splits=num_splits,
        num_warps=num_warps, num_stages=choices.get("num_stages", 3 if block_d <= 128 else 2),
    )


if triton is not None:

    @triton.jit
    def _branch_step(
        q, cache_ptrs, scale_ptrs, token_ok, d_ok, rope_scores, allowed, scale_log2, m_i, l_i, acc,
        IS_FP8: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One branch's online-softmax update over a block of tokens (scores in log2 units). fp8 cache: the e4m3
        values convert exactly to the query's dtype (bf16 or fp32) and each token's float32 scale multiplies its
        score and its probability."""
        latent = tl.load(cache_ptrs, mask=token_ok[:, None] & d_ok[None, :], other=0.0).to(q.dtype)  # [N, D]
        scores = tl.dot(q, tl.trans(latent), input_precision=PRECISION)
        if IS_FP8:
            scales = tl.load(scale_ptrs, mask=token_ok, other=0.0)
            scores = scores * scales[None, :]
        scores = (scores + rope_scores) * scale_log2
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IS_FP8:
            p = p * scales[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(latent.dtype), latent, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _store_branch(out_ptr, lse_ptr, acc, m_i, l_i, out_offsets, lse_offsets, row_ok, d_ok, FINAL: tl.constexpr):
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        if FINAL:
            tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        else:
            tl.store(out_ptr + out_offsets, out, mask=row_ok[:, None] & d_ok[None, :])
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
            tl.store(lse_ptr + lse_offsets, lse, mask=row_ok)

    @triton.jit
    def _mlra_decode_kernel(
        q_ptr, q_rope_ptr, cache_ptr, scale_ptr, rope_key_ptr, seq_lens_ptr, key_mask_ptr, row_starts_ptr, out_ptr,
        lse_ptr,
        stride_seq_lens, stride_qn, stride_qt, stride_qb, stride_qh,
        stride_rn, stride_rt, stride_rh,
        stride_cn, stride_cs, stride_sn, stride_ss, stride_kn, stride_ks,
        stride_mn,
        stride_on, stride_os, stride_ot, stride_ob, stride_oh,
        stride_ln, stride_ls, stride_lt, stride_lb,
        scale_log2, num_new_tokens, heads_per_group, latent_block_dim, rope_dim, rope_offset, scales_offset, num_splits,
        NUM_GROUPS: tl.constexpr, BRANCH_PARTS: tl.constexpr, BRANCHES_PER_PROGRAM: tl.constexpr,
        HEAD_TILES: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_ROW_STARTS: tl.constexpr,
        IS_FP8: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # program -> (batch row, head group, part of the branches, tile of heads), head tiles adjacent so that
        # programs re-reading the same tokens for other heads run together and hit L2
        program = tl.program_id(0)
        split = tl.program_id(1)
        head_tile = program % HEAD_TILES
        branch0 = (program // HEAD_TILES) % BRANCH_PARTS * BRANCHES_PER_PROGRAM
        group = (program // (HEAD_TILES * BRANCH_PARTS)) % NUM_GROUPS
        row = (program // (HEAD_TILES * BRANCH_PARTS * NUM_GROUPS)).to(tl.int64)

        # query rows: m = local head * BLOCK_T + new token
        rows = tl.arange(0, BLOCK_M)
        local_head = head_tile * BLOCK_H + rows // BLOCK_T
        new_token = rows % BLOCK_T
        row_ok = (rows < BLOCK_H * BLOCK_T) & (local_head < heads_per_group) & (new_token < num_new_tokens)
        head = group * heads_per_group + local_head
        d = tl.arange(0, BLOCK_D)
        d_ok = d < latent_block_dim
        r = tl.arange(0, BLOCK_R)
        r_ok = r < rope_dim

        seq_len = tl.load(seq_lens_ptr + row * stride_seq_lens).to(tl.int32)
        query_slot = seq_len - num_new_tokens + new_token  # causal rule among the new tokens
        chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, seq_len)

        q_rows = q_ptr + row * stride_qn + new_token * stride_qt + branch0 * stride_qb + head * stride_qh
        q_mask = row_ok[:, None] & d_ok[None, :]
        q0 = tl.load(q_rows[:, None] + d[None, :], mask=q_mask, other=0.0)
        q1 = q0
        q2 = q0
        q3 = q0
        if BRANCHES_PER_PROGRAM > 1:
            q1 = tl.load(q_rows[:, None] + stride_qb + d[None, :], mask=q_mask, other=0.0)
        if BRANCHES_PER_PROGRAM > 2:
            q2 = tl.load(q_rows[:, None] + 2 * stride_qb + d[None, :], mask=q_mask, other=0.0)
        if BRANCHES_PER_PROGRAM > 3:
            q3 = tl.load(q_rows[:, None] + 3 * stride_qb + d[None, :], mask=q_mask, other=0.0)
        q_rope = tl.load(
            q_rope_ptr + row * stride_rn + new_token[:, None] * stride_rt + head[:, None] * stride_rh + r[None, :],
            mask=row_ok[:, None] & r_ok[None, :],
            other=0.0,
        )

        m0 = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l0 = tl.zeros([BLOCK_M], tl.float32)
        acc0 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        m1, l1, acc1 = m0, l0, acc0
        m2, l2, acc2 = m0, l0, acc0
        m3, l3, acc3 = m0, l0, acc0

        # branch b of this group reads latent block b * G + group (MLRAConfig.latent_block)
        first_block = branch0 * NUM_GROUPS + group
        block_step = NUM_GROUPS * latent_block_dim
        if HAS_ROW_STARTS:  # rows packed along the token axis (continuous batching): row n starts at token row_starts[n]
            first_token = tl.load(row_starts_ptr + row).to(tl.int64)
            row_cache = cache_ptr + first_token * stride_cs
            row_scales = scale_ptr + first_token * stride_ss
            row_rope_key = rope_key_ptr + first_token * stride_ks
        else:
            row_cache = cache_ptr + row * stride_cn
            row_scales = scale_ptr + row * stride_sn
            row_rope_key = rope_key_ptr + row * stride_kn
        row_scales += scales_offset + first_block
        row_rope_key += rope_offset
        for token_start in range(start, end, BLOCK_N):
            tokens = token_start + tl.arange(0, BLOCK_N)
            token_ok = tokens < end
            allowed = token_ok[None, :] & (tokens[None, :] <= query_slot[:, None])
            if HAS_KEY_MASK:
                key_valid = tl.load(key_mask_ptr + row * stride_mn + tokens, mask=token_ok, other=0) != 0
                allowed = allowed & (key_valid[None, :] | (tokens[None, :] == query_slot[:, None]))
            tokens64 = tokens.to(tl.int64)
            rope_key = tl.load(
                row_rope_key + tokens64[:, None] * stride_ks + r[None, :], mask=token_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
            rope_scores = tl.dot(q_rope, tl.trans(rope_key), input_precision=PRECISION)  # once for all branches
            block_ptrs = row_cache + tokens64[:, None] * stride_cs + first_block * latent_block_dim + d[None, :]
            scale_ptrs = row_scales + tokens64 * stride_ss
            m0, l0, acc0 = _branch_step(
                q0, block_ptrs, scale_ptrs, token_ok, d_ok, rope_scores, allowed, scale_log2, m0, l0, acc0, IS_FP8,
                PRECISION,
            )
            if BRANCHES_PER_PROGRAM > 1:
                m1, l1, acc1 = _branch_step(
                    q1, block_ptrs + block_step, scale_ptrs + NUM_GROUPS, token_ok, d_ok, rope_scores, allowed,
                    scale_log2, m1, l1, acc1, IS_FP8, PRECISION,
                )
            if BRANCHES_PER_PROGRAM > 2:
                m2, l2, acc2 = _branch_step(
                    q2, block_ptrs + 2 * block_step, scale_ptrs + 2 * NUM_GROUPS, token_ok, d_ok, rope_scores, allowed,
                    scale_log2, m2, l2, acc2, IS_FP8, PRECISION,
                )
            if BRANCHES_PER_PROGRAM > 3:
                m3, l3, acc3 = _branch_step(
                    q3, block_ptrs + 3 * block_step, scale_ptrs + 3 * NUM_GROUPS, token_ok, d_ok, rope_scores, allowed,
                    scale_log2, m3, l3, acc3, IS_FP8, PRECISION,
                )

        final = not SPLIT
        out_offsets = row * stride_on + split * stride_os + new_token[:, None] * stride_ot + branch0 * stride_ob
        out_offsets += head[:, None] * stride_oh + d[None, :]
        lse_offsets = row * stride_ln + split * stride_ls + new_token * stride_lt + branch0 * stride_lb + head
        _store_branch(out_ptr, lse_ptr, acc0, m0, l0, out_offsets, lse_offsets, row_ok, d_ok, final)
        if BRANCHES_PER_PROGRAM > 1:
            _store_branch(
                out_ptr, lse_ptr, acc1, m1, l1, out_offsets + stride_ob, lse_offsets + stride_lb, row_ok, d_ok, final
            )
        if BRANCHES_PER_PROGRAM > 2:
            _store_branch(
                out_ptr, lse_ptr, acc2, m2, l2, out_offsets + 2 * stride_ob, lse_offsets + 2 * stride_lb, row_ok,
                d_ok, final,
            )
        if BRANCHES_PER_PROGRAM > 3:
            _store_branch(
                out_ptr, lse_ptr, acc3, m3, l3, out_offsets + 3 * stride_ob, lse_offsets + 3 * stride_lb, row_ok,
                d_ok, final,
            )

    @triton.jit
    def _merge_splits_kernel(
        partial_ptr, lse_ptr, out_ptr, rows_per_batch, latent_block_dim, num_splits,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (batch row, new token, branch, head): out = sum_s w_s partial_s / sum_s w_s with
        w_s = 2^(lse_s - max lse). Partials [bsz, splits, rows_per_batch, d_l] fp32, lse [bsz, splits, rows]."""
        program = tl.program_id(0)
        batch_row = program // rows_per_batch
        inner = program % rows_per_batch
        d = tl.arange(0, BLOCK_D)
        d_ok = d < latent_block_dim
        top = tl.full([BLOCK_S], float("-inf"), tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            lse = tl.load(lse_ptr + (batch_row * num_splits + s) * rows_per_batch + inner, mask=s < num_splits,
                          other=float("-inf"))
            top = tl.maximum(top, lse)
        top_all = tl.max(top, 0)
        top_all = tl.where(top_all == float("-inf"), 0.0, top_all)
        total = tl.zeros([BLOCK_S], tl.float32)
        acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            split_rows = (batch_row * num_splits + s) * rows_per_batch + inner
            lse = tl.load(lse_ptr + split_rows, mask=s < num_splits, other=float("-inf"))
            weights = tl.exp2(lse - top_all)
            partial = tl.load(
                partial_ptr + split_rows.to(tl.int64)[:, None] * latent_block_dim + d[None, :],
                mask=(s < num_splits)[:, None] & d_ok[None, :],
                other=0.0,
            )
            total += weights
            acc += partial * weights[:, None]
        denominator = tl.sum(total, 0)
        denominator = tl.where(denominator == 0.0, 1.0, denominator)
        out = tl.sum(acc, 0) / denominator
        tl.store(out_ptr + program.to(tl.int64) * latent_block_dim + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _decode_attention(
    q_absorbed, q_rope, kv_cache, seq_lens, key_mask, num_groups, scaling, num_splits, choices=None, row_starts=None
):
    """The two launches (split attention, merge); `choices` overrides launch-config defaults (benchmark sweeps)."""
    bsz, num_new_tokens, num_branches, num_heads, latent_block_dim = q_absorbed.shape
    rope_dim = q_rope.shape[-1]
    heads_per_group = num_heads // num_groups
    num_blocks = num_branches * num_groups
    device = kv_cache.device
    choices = {**(choices or {}), **({"num_splits": num_splits} if num_splits else {})}
    # packed rows (continuous batching) hold a different number of tokens at every step: rounded, so that the cached
    # launch configs stay few
    capacity = kv_cache.shape[1] if row_starts is None else triton.next_power_of_2(kv_cache.shape[1])
    config = launch_config(
        bsz, num_groups, heads_per_group, num_branches, latent_block_dim, rope_dim, num_new_tokens,
        capacity, kv_cache.shape[2] * kv_cache.element_size(), _num_sms(device.index or 0),
        operand_bytes=q_absorbed.element_size(), **choices,
    )
    num_splits = config["num_splits"]
    branches_per_program = config["BRANCHES_PER_PROGRAM"]
    is_fp8 = kv_cache.dtype == torch.uint8
    if is_fp8:  # packed rows of the fp8 cache (`fp8_cache_layout`): three views of the same bytes
        layout = fp8_cache_layout(num_blocks, latent_block_dim, rope_dim, q_rope.dtype)
        if kv_cache.shape[-1] != layout.row_bytes:
            raise ValueError(
                f"fp8 latent cache rows of {kv_cache.shape[-1]} bytes, expected {layout.row_bytes} for {num_blocks} "
                f"blocks of {latent_block_dim}, rope {rope_dim} in {q_rope.dtype}"
            )
        latent, scales, rope_key = (kv_cache.view(dtype) for dtype in (torch.float8_e4m3fn, torch.float32, q_rope.dtype))
        scales_offset, rope_offset = layout.scales_offset // 4, layout.rope_offset // q_rope.element_size()
    else:
        latent = scales = rope_key = kv_cache
        scales_offset, rope_offset = 0, num_blocks * latent_block_dim
    out = q_absorbed.new_empty(q_absorbed.shape)
    if num_splits == 1:
        partial, lse = out, out  # written directly, normalized; lse unused
        partial_strides = out.stride()[:1] + (0,) + out.stride()[1:4]
        lse_strides = (0, 0, 0, 0)
    else:
        partial = q_absorbed.new_empty(
            (bsz, num_splits, num_new_tokens, num_branches, num_heads, latent_block_dim), dtype=torch.float32
        )
        lse = q_absorbed.new_empty((bsz, num_splits, num_new_tokens, num_branches, num_heads), dtype=torch.float32)
        partial_strides = partial.stride()[:5]
        lse_strides = lse.stride()[:4]
    has_key_mask = key_mask is not None
    has_row_starts = row_starts is not None
    branch_parts = num_branches // branches_per_program
    grid = (bsz * num_groups * branch_parts * config["head_tiles"], num_splits)
    _mlra_decode_kernel[grid](
        q_absorbed, q_rope, latent, scales, rope_key, seq_lens, key_mask if has_key_mask else seq_lens,
        row_starts if has_row_starts else seq_lens, partial, lse,
        seq_lens.stride(0), *q_absorbed.stride()[:4],
        *q_rope.stride()[:3],
        *latent.stride()[:2], *scales.stride()[:2], *rope_key.stride()[:2],
        key_mask.stride(0) if has_key_mask else 0,
        *partial_strides,
        *lse_strides,
        scaling * math.log2(math.e), num_new_tokens, heads_per_group, latent_block_dim, rope_dim, rope_offset,
        scales_offset, num_splits,
        NUM_GROUPS=num_groups, BRANCH_PARTS=branch_parts, BRANCHES_PER_PROGRAM=branches_per_program,
        HEAD_TILES=config["head_tiles"], SPLIT=num_splits > 1,
        BLOCK_H=config["BLOCK_H"], BLOCK_T=config["BLOCK_T"], BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
        BLOCK_D=config["BLOCK_D"], BLOCK_R=max(16, triton.next_power_of_2(rope_dim)), HAS_KEY_MASK=has_key_mask,
        HAS_ROW_STARTS=has_row_starts, IS_FP8=is_fp8,
        PRECISION="ieee" if q_absorbed.dtype == torch.float32 else "tf32",
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    if num_splits > 1:
        rows_per_batch = num_new_tokens * num_branches * num_heads
        _merge_splits_kernel[(bsz * rows_per_batch,)](
            partial, lse, out, rows_per_batch, latent_block_dim, num_splits,
            BLOCK_S=16,
            BLOCK_D=config["BLOCK_D"], num_warps=4,
        )
    return out


if triton is not None:

    @torch.library.custom_op("mlra::decode_attention", mutates_args=())
    def _decode_attention_op(
        q_absorbed: torch.Tensor,
        q_rope: torch.Tensor,
        kv_cache: torch.Tensor,
        seq_lens: torch.Tensor,
        key_mask: torch.Tensor | None,
        num_groups: int,
        scaling: float,
        num_splits: int,
        row_starts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _decode_attention(
            q_absorbed, q_rope, kv_cache, seq_lens, key_mask, num_groups, scaling, num_splits, row_starts=row_starts
        )

    @_decode_attention_op.register_fake
    def _(q_absorbed, q_rope, kv_cache, seq_lens, key_mask, num_groups, scaling, num_splits, row_starts=None):
        return q_absorbed.new_empty(q_absorbed.shape)


def mlra_decode_attention(
    q_absorbed: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    key_mask: torch.Tensor | None,
    num_groups: int,
    scaling: float,
    num_splits: int = 0,
    row_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed decode attention of one layer on the compressed cache, all heads and branches in one launch.

    q_absorbed [bsz, T, B, h, d_l]: W_UK folded into each head's no-rope query, per branch; q_rope [bsz, T, h, d_r];
    kv_cache [bsz, capacity, L * d_l + d_r] with L = B * num_groups (a rank's share under tensor parallelism);
    seq_lens [bsz]: valid tokens per row, the T new ones included (they sit at seq_len - T ... seq_len - 1, and see
    keys up to their own slot); key_mask [bsz, >= max seq_len] (nonzero: the key may be attended) or None; a query
    always sees its own slot. num_splits: sequence slices (0: from the shapes and the GPU's size). row_starts [bsz]
    (continuous batching): the rows are packed one after another along the token axis of kv_cache [1, total, width],
    row n from token row_starts[n]. Returns z [bsz, T, B, h, d_l], the softmax-weighted latent before W_UV.
    """
    if q_absorbed.stride(-1) != 1:
        q_absorbed = q_absorbed.contiguous()
    if q_rope.stride(-1) != 1:
        q_rope = q_rope.contiguous()
    if torch.compiler.is_compiling():
        return _decode_attention_op(
            q_absorbed, q_rope, kv_cache, seq_lens, key_mask, num_groups, scaling, num_splits, row_starts
        )
    # eager: straight to the launches, without the custom op's dispatch overhead (tens of microseconds per call)
    return _decode_attention(
        q_absorbed, q_rope, kv_cache, seq_lens, key_mask, num_groups, scaling, num_splits, row_starts=row_starts
    )
