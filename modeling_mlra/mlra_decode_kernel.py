"""Fused Triton kernel for absorbed decoding on the compressed latent cache (flash-decoding).

One call serves one layer, all heads and all softmax branches:

    z[n, t, b, i] = softmax_s((qa[n, t, b, i] . c[n, s, l] + q_rope[n, t, i] . kr[n, s]) * scaling) . c[n, s, l]

with l = b * G + g(i) the latent block that branch b of head i reads (`MLRAConfig.latent_block`). The cache row of a
token is [c_0 | c_1 | ... | c_{L-1} | kr] (width L * d_l + d_r), the layout `MLRALatentCacheLayer` keeps.

Each program owns (batch row, latent block, tile of heads, slice of the sequence): the heads of one group for one
softmax branch. It streams its slice of the cache once: per block of tokens it loads the latent block and the rope
key and runs one online softmax. A second small kernel merges the slices by log-sum-exp. The cache may also be the fp8
cache's packed rows (`fp8_cache_layout`), converted in registers. The model code calls `mlra_decode_attention`, a torch
custom op with a fake implementation, so torch.compile(fullgraph=True) and CUDA graphs capture it without a graph
break. See docs/decode_kernel.md.
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


class LatentPages(NamedTuple):
    """Latent rows kept in pages (continuous batching), read in place by the kernel: token t's row [c | kr] of width
    2 * half is key_pages[slots[t]] followed by value_pages[slots[t]]. key_pages, value_pages [pages x tokens per
    page, half] (views of the paged cache's tensors); slots [tokens] (its read index: the packed rows' tokens, row
    after row)."""

    key_pages: torch.Tensor
    value_pages: torch.Tensor
    slots: torch.Tensor

    def gather(self, tokens: slice = slice(None)) -> torch.Tensor:
        """The rows of these tokens, [1, n, 2 * half] (a copy: for the PyTorch paths)."""
        slots = self.slots[tokens]
        return torch.cat([self.key_pages.index_select(0, slots), self.value_pages.index_select(0, slots)], -1)[None]


def kernel_supports(
    num_branches: int, latent_block_dim: int, rope_dim: int, num_new_tokens: int, dtype: torch.dtype,
    cache_dtype: torch.dtype | None = None,
) -> bool:
    """Whether `mlra_decode_attention` handles this shape and dtype (else the PyTorch absorbed path runs).
    cache_dtype: torch.float8_e4m3fn for the fp8 cache, else None (the model's dtype)."""
    return (
        triton is not None
        and num_branches >= 1
        and 1 <= num_new_tokens <= MAX_NEW_TOKENS
        and latent_block_dim <= 512
        and rope_dim <= 128
        and dtype in (torch.float16, torch.bfloat16, torch.float32)
        and cache_dtype in (None, dtype, torch.float8_e4m3fn)
    )


@functools.cache
def _num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 8  # the interpreter: a few splits, enough to exercise the merge
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# fp32 accumulator values per thread ([query rows, d_l] per program); beyond these ptxas spills registers on sm_90
# (compiled offline: benchmarks/compile_decode_kernel.py)
ACCUMULATOR_VALUES_PER_THREAD = 128


@functools.cache
def launch_config(
    bsz: int, num_groups: int, heads_per_group: int, num_branches: int, latent_block_dim: int, rope_dim: int,
    num_new_tokens: int, capacity: int, token_bytes: int, fp8: bool, operand_bytes: int = 2, **choices,
) -> dict:
    """Tiles and warps, and the bounds of the sequence split, from shapes only (no tensor values: CUDA-graph safe).

    fp8: the cache is the fp8 cache's packed rows; operand_bytes: the queries' element size (4: float32). `choices`
    overrides a default (benchmark sweeps): num_warps, num_stages, BLOCK_N, MIN_ROWS (query rows padded up to this; 64
    lets Hopper's wgmma run the dots), num_splits, programs_per_sm, HOIST_OFFSETS (0 or 1: the token loop's address
    offsets computed once outside it).

    One program runs one latent block (one softmax branch of one head group) for a tile of heads. (Several branches
    per program, the rope key loaded once for them, were slower on the H200: docs/decode_kernel.md.) The address
    offsets are hoisted where registers allow (16-bit caches, blocks up to 128 wide: 199 -> 191 us there; for MLA's
    and the fp8 loops they spilled). Defaults from the H200 sweeps (benchmarks/results/decode_kernel_h200_quick.md,
    decode_kernel_h200_lean_loop.md): 64-token blocks; 4 warps for latent blocks up to 128
    wide, so that several programs share a multiprocessor, with 16-bit query rows padded to 64 so that the dots run on
    wgmma (the 2.9B layer's 24 heads: 208 us at 16 x 32K against 228 us on 32-row mma.sync, although the padding
    multiplies the dots' work by 2.7); 8 warps for wider ones (MLA's 512: all 64 heads in one program, so the cache
    is read once), 2 stages so that the tiles fit shared memory. From the fp8 cache: 128-token blocks in 2 stages for
    blocks up to 128 wide (the per-block conversion work amortized: 140 us at 1M for the share against 158), 32-token
    blocks in 3 stages for wider ones (64 spill registers: 822 us against 427 for MLA at 512K). `_decode_attention`
    then splits the sequence so that the programs fill the multiprocessors once, as many per multiprocessor as fit by
    registers and shared memory (`_programs_per_sm`), and at most `max_splits`: each split reads several times more
    cache bytes than it writes partial results.
    """
    block_d = max(16, triton.next_power_of_2(latent_block_dim))
    block_t = triton.next_power_of_2(num_new_tokens)
    heads = triton.next_power_of_2(heads_per_group)
    num_warps = choices.get("num_warps", 8 if block_d >= 256 else 4)
    max_rows = max(16, ACCUMULATOR_VALUES_PER_THREAD * 32 * num_warps // block_d)
    if operand_bytes == 4:
        # float32 operands (exact "ieee" dots on the FMA units, every tile in float32): for sm_90, 128 query rows of a
        # published layer spilled 20 KB per thread and took 70 s to compile, 32 rows 9 KB and 12 s
        max_rows = min(max_rows, 32)
    block_h = min(heads, max(1, max_rows // block_t))
    block_m = max(choices.get("MIN_ROWS", 64 if operand_bytes == 2 else 16), block_h * block_t)
    head_tiles = triton.cdiv(heads_per_group, block_h)
    partial_bytes = num_new_tokens * num_branches * num_groups * heads_per_group * latent_block_dim * 4
    min_tokens = max(256, 4 * partial_bytes // token_bytes)
    block_n, num_stages = (64, 3) if block_d <= 128 else (64, 2)
    if fp8:
        block_n, num_stages = (128, 2) if block_d <= 128 else (32, 3)
    return dict(
        BLOCK_H=block_h, BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_N=choices.get("BLOCK_N", block_n),
        HOIST_OFFSETS=bool(choices.get("HOIST_OFFSETS", not fp8 and block_d <= 128)),
        head_tiles=head_tiles, programs=bsz * num_branches * num_groups * head_tiles,
        max_splits=min(triton.cdiv(capacity, min_tokens), 512), num_warps=num_warps,
        num_stages=choices.get("num_stages", num_stages),
    )


def _strides(shape: tuple) -> list:
    """The strides of a contiguous tensor of this shape."""
    return [math.prod(shape[dim + 1 :]) for dim in range(len(shape))]


_PROGRAMS_PER_SM = {}  # (device, argument dtypes, compile-time choices) -> programs that fit one multiprocessor


def _programs_per_sm(device: torch.device, args: list, constexprs: dict) -> int:
    """How many programs of the compiled kernel run at once on one multiprocessor, by its registers, shared memory and
    threads (compiled with these arguments, without launching it); 1 in the interpreter."""
    arguments = tuple(arg.dtype if isinstance(arg, torch.Tensor) else arg for arg in args)  # strides are constexprs
    key = (device.index, arguments, tuple(constexprs.items()))
    if key not in _PROGRAMS_PER_SM:
        if not torch.cuda.is_available():
            return 1
        kernel = _mlra_decode_kernel.warmup(*args, grid=(1,), **constexprs)
        kernel._init_handles()  # loads the binary, which reports its registers per thread
        properties = torch.cuda.get_device_properties(device)
        warps = constexprs["num_warps"]
        registers_per_warp = -(-kernel.n_regs * 32 // 256) * 256  # allocated in units of 256
        _PROGRAMS_PER_SM[key] = max(1, min(
            65536 // (registers_per_warp * warps),
            properties.shared_memory_per_multiprocessor // (kernel.metadata.shared + 1024),  # 1 KB reserved each
            properties.max_threads_per_multi_processor // (32 * warps),
        ))
    return _PROGRAMS_PER_SM[key]


if triton is not None:

    @triton.jit
    def _e4m3_to(raw, dtype: tl.constexpr):
        """e4m3 bytes (uint8) -> their values in `dtype`, exactly. For bf16 the default conversion runs through the
        quarter-rate conversion unit, one instruction per value (cvt.rn.bf16.f16); here e4m3 -> fp16 pairs -> fp32 ->
        bf16 pairs take two full-rate instructions per value."""
        if dtype == tl.bfloat16:
            return tl.inline_asm_elementwise(
                """{
                .reg .b16 lo, hi;
                .reg .b32 h01, h23;
                .reg .f16 x0, x1, x2, x3;
                .reg .f32 f0, f1, f2, f3;
                mov.b32 {lo, hi}, $2;
                cvt.rn.f16x2.e4m3x2 h01, lo;
                cvt.rn.f16x2.e4m3x2 h23, hi;
                mov.b32 {x0, x1}, h01;
                mov.b32 {x2, x3}, h23;
                cvt.f32.f16 f0, x0;
                cvt.f32.f16 f1, x1;
                cvt.f32.f16 f2, x2;
                cvt.f32.f16 f3, x3;
                cvt.rn.bf16x2.f32 $0, f1, f0;
                cvt.rn.bf16x2.f32 $1, f3, f2;
                }""",
                "=r,=r,r", [raw], dtype=tl.bfloat16, is_pure=True, pack=4,
            )
        return raw.to(tl.float8e4nv, bitcast=True).to(dtype)

    @triton.jit
    def _load_halves(key_ptrs, value_ptrs, in_keys, mask):
        """A tile whose columns `in_keys` lie in the key pages and the others in the value pages: two masked loads."""
        from_keys = tl.load(key_ptrs, mask=mask & in_keys, other=0.0)
        from_values = tl.load(value_ptrs, mask=mask & ~in_keys, other=0.0)
        return tl.where(in_keys, from_keys, from_values)

    @triton.jit
    def _token_block(
        token_start, end, query_slot, q, q_rope, block_cache, block_scales, rope_key_ptr, key_mask_row, d, r,
        stride_cs: tl.constexpr, stride_ss: tl.constexpr, stride_ks: tl.constexpr, scale_log2, m_i, l_i, acc, scale_ref,
        row_slots, block_values, values_from, rope_values,
        MASKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr, IS_FP8: tl.constexpr, PRECISION: tl.constexpr,
        LATENT_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HOIST_OFFSETS: tl.constexpr,
        PAGED: tl.constexpr, STRADDLE: tl.constexpr, ROPE_SPLIT: tl.constexpr,
    ):
        """The online-softmax update over one block of BLOCK_N tokens (scores in log2 units) of the program's softmax
        branch: its latent block and the rope key.

        MASKED: the block may hold tokens past the split's end or later than a new token's slot (the causal rule).
        Blocks of tokens before the first new token are visible to every query row: they skip those comparisons, and
        their loads are unpredicated.

        fp8 cache: the e4m3 values convert exactly to q's dtype (`_e4m3_to`) and each token's float32 scale multiplies
        its score. The probabilities times the scales enter the second dot divided by `scale_ref`, the largest scale
        seen so far, so that they are at most 1 (inside fp16's range too); the accumulator is kept in units of
        scale_ref and rescaled when it grows.

        PAGED (continuous batching, pages read in place): token t of the row lies at slot row_slots[t] of the key and of
        the value pages (row stride stride_cs in both); block_cache and rope_key_ptr point at the block's and the rope
        key's first column in the pages that hold them. STRADDLE: the (single) latent block's columns from values_from
        on lie in the value pages, at block_values; ROPE_SPLIT > 0: the rope key's columns from ROPE_SPLIT on lie in
        the value pages, at rope_values. Those tiles take two masked loads, the others one."""
        tokens = token_start + tl.arange(0, BLOCK_N)
        token_ok = tokens < end
        d_ok = d < LATENT_DIM
        r_ok = r < ROPE_DIM
        allowed = None
        if MASKED:
            allowed = token_ok[None, :] & (tokens[None, :] <= query_slot[:, None])
            if HAS_KEY_MASK:
                key_valid = tl.load(key_mask_row + tokens, mask=token_ok, other=0) != 0
                allowed = allowed & (key_valid[None, :] | (tokens[None, :] == query_slot[:, None]))
            latent_mask = token_ok[:, None] & d_ok[None, :]
            rope_mask = token_ok[:, None] & r_ok[None, :]
        else:
            if HAS_KEY_MASK:
                allowed = (tl.load(key_mask_row + tokens) != 0)[None, :]
            latent_mask = d_ok[None, :]
            rope_mask = r_ok[None, :]
        if PAGED:  # the tokens' slots in the pages (the paged cache's read index)
            first = 0
            if MASKED:
                within = tl.load(row_slots + tokens, mask=token_ok, other=0).to(tl.int64)
            else:
                within = tl.load(row_slots + tokens).to(tl.int64)
        elif HOIST_OFFSETS:
            # addresses as the block's first token (a 64-bit scalar) plus offsets within the block, the same for every
            # block (computed once outside the token loop): fewer address instructions per block, more registers
            first = tl.cast(token_start, tl.int64)
            within = tl.arange(0, BLOCK_N)
        else:
            first = 0
            within = tokens.to(tl.int64)
        rope_offsets = first * stride_ks + (within[:, None] * stride_ks + r[None, :])
        if ROPE_SPLIT > 0:
            rope_key = _load_halves(rope_key_ptr + rope_offsets, rope_values + rope_offsets, r[None, :] < ROPE_SPLIT,
                                    rope_mask)
        else:
            rope_key = tl.load(rope_key_ptr + rope_offsets, mask=rope_mask, other=0.0)
        latent_offsets = within[:, None] * stride_cs + d[None, :]
        latent_ptrs = block_cache + first * stride_cs + latent_offsets
        if IS_FP8:
            latent = _e4m3_to(tl.load(latent_ptrs, mask=latent_mask, other=0), q.dtype)
            scales_ptrs = block_scales + first * stride_ss + within * stride_ss
            if MASKED:
                scales = tl.load(scales_ptrs, mask=token_ok, other=0.0)
            else:
                scales = tl.load(scales_ptrs)
            scores = tl.dot(q, tl.trans(latent), input_precision=PRECISION) * scales[None, :]
        else:
            if STRADDLE:
                latent = _load_halves(latent_ptrs, block_values + first * stride_cs + latent_offsets,
                                      d[None, :] < values_from, latent_mask)
            else:
                latent = tl.load(latent_ptrs, mask=latent_mask, other=0.0)  # [N, D]
            scores = tl.dot(q, tl.trans(latent), input_precision=PRECISION)
        scores = tl.dot(q_rope, tl.trans(rope_key), scores, input_precision=PRECISION)
        if MASKED or HAS_KEY_MASK:
            scores = tl.where(allowed, scores, float("-inf"))
        # the scale applied to the row maximum (the same value: it is positive) and inside the exponential's argument
        # (one fused multiply-add), not to every score first
        m_new = tl.maximum(m_i, tl.max(scores, 1) * scale_log2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores * scale_log2 - m_safe[:, None])
        l_new = l_i * alpha + tl.sum(p, 1)
        if IS_FP8:
            grown_ref = tl.maximum(scale_ref, tl.max(scales, 0))
            alpha = alpha * (scale_ref / grown_ref)
            p = p * (scales / grown_ref)[None, :]
            scale_ref = grown_ref
        acc = acc * alpha[:, None] + tl.dot(p.to(latent.dtype), latent, input_precision=PRECISION)
        return m_new, l_new, acc, scale_ref

    @triton.jit(do_not_specialize=["num_splits"])  # one compiled kernel for every split count
    def _mlra_decode_kernel(
        q_ptr, q_rope_ptr, cache_ptr, scale_ptr, rope_key_ptr, seq_lens_ptr, key_mask_ptr, row_starts_ptr, value_ptr,
        slots_ptr, out_ptr, lse_ptr,
        stride_seq_lens, stride_qn, stride_qt, stride_qb, stride_qh,
        stride_rn, stride_rt, stride_rh,
        stride_cn, stride_cs: tl.constexpr, stride_sn, stride_ss: tl.constexpr, stride_kn, stride_ks: tl.constexpr,
        stride_mn,
        stride_on, stride_os, stride_ot, stride_ob, stride_oh,
        stride_ln, stride_ls, stride_lt, stride_lb,
        scale_log2, num_new_tokens, heads_per_group, rope_offset, scales_offset, num_splits,
        NUM_GROUPS: tl.constexpr, NUM_BLOCKS: tl.constexpr, HEAD_TILES: tl.constexpr, SPLIT: tl.constexpr,
        LATENT_DIM: tl.constexpr, ROPE_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_ROW_STARTS: tl.constexpr,
        IS_FP8: tl.constexpr, PRECISION: tl.constexpr, HOIST_OFFSETS: tl.constexpr,
        PAGED: tl.constexpr, HALF: tl.constexpr, ROPE_SPLIT: tl.constexpr,
    ):
        # program -> (batch row, latent block, tile of heads), head tiles adjacent so that programs re-reading the same
        # tokens for other heads run together and hit L2. Latent block l = b * G + g is read by branch b of the heads
        # of group g (MLRAConfig.latent_block).
        program = tl.program_id(0)
        split = tl.program_id(1)
        head_tile = program % HEAD_TILES
        block = (program // HEAD_TILES) % NUM_BLOCKS
        branch = block // NUM_GROUPS
        group = block % NUM_GROUPS
        row = (program // (HEAD_TILES * NUM_BLOCKS)).to(tl.int64)

        # query rows: m = local head * BLOCK_T + new token
        rows = tl.arange(0, BLOCK_M)
        local_head = head_tile * BLOCK_H + rows // BLOCK_T
        new_token = rows % BLOCK_T
        row_ok = (rows < BLOCK_H * BLOCK_T) & (local_head < heads_per_group) & (new_token < num_new_tokens)
        head = group * heads_per_group + local_head
        d = tl.arange(0, BLOCK_D)
        d_ok = d < LATENT_DIM
        r = tl.arange(0, BLOCK_R)

        seq_len = tl.load(seq_lens_ptr + row * stride_seq_lens).to(tl.int32)
        query_slot = seq_len - num_new_tokens + new_token  # causal rule among the new tokens
        chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, seq_len)
        # whole blocks of tokens before the first new token run unmasked; the rest (at most two blocks) masked
        unmasked_end = start + tl.maximum(tl.minimum(end, seq_len - num_new_tokens) - start, 0) // BLOCK_N * BLOCK_N

        q_offsets = row * stride_qn + new_token * stride_qt + branch * stride_qb + head * stride_qh
        q = tl.load(q_ptr + q_offsets[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        q_rope = tl.load(
            q_rope_ptr + row * stride_rn + new_token[:, None] * stride_rt + head[:, None] * stride_rh + r[None, :],
            mask=row_ok[:, None] & (r < ROPE_DIM)[None, :],
            other=0.0,
        )

        # online-softmax state; fp8: the largest scale so far (any positive start)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        scale_ref = tl.full([], 1.0e-30, tl.float32)
        if HAS_ROW_STARTS:  # rows packed along the token axis (continuous batching): row n starts at token row_starts[n]
            first_token = tl.load(row_starts_ptr + row).to(tl.int64)
            row_cache = cache_ptr + first_token * stride_cs
            row_scales = scale_ptr + first_token * stride_ss
            row_rope_key = rope_key_ptr + first_token * stride_ks
        else:
            row_cache = cache_ptr + row * stride_cn
            row_scales = scale_ptr + row * stride_sn
            row_rope_key = rope_key_ptr + row * stride_kn
        block_cache = row_cache + block * LATENT_DIM
        block_scales = row_scales + scales_offset + block
        row_rope_key += rope_offset
        key_mask_row = key_mask_ptr + row * stride_mn
        # continuous batching reading the pages in place (PAGED): the row's tokens at slots_ptr[first_token:], their
        # columns up to HALF in the key pages (cache_ptr), the others in the value pages (value_ptr)
        row_slots, block_values, values_from, rope_values = slots_ptr, value_ptr, 0, value_ptr
        if PAGED:
            row_slots = slots_ptr + first_token
            block_column = block * LATENT_DIM
            values_from = HALF - block_column  # the block's first column in the value pages, counted in the block
            block_values = value_ptr + (block_column - HALF)
            if values_from > 0:
                block_cache = cache_ptr + block_column
            else:
                block_cache = block_values
            rope_values = value_ptr + (NUM_BLOCKS * LATENT_DIM - HALF)
            if NUM_BLOCKS * LATENT_DIM < HALF:
                row_rope_key = cache_ptr + NUM_BLOCKS * LATENT_DIM
            else:
                row_rope_key = rope_values
            # the one block whose columns straddle the two pages runs its own loop of two loads per tile; the other
            # programs run the loops below, one load per tile
            straddles = (values_from > 0) & (values_from < LATENT_DIM)
            for token_start in tl.range(start, tl.where(straddles, end, start), BLOCK_N):
                m_i, l_i, acc, scale_ref = _token_block(
                    token_start, end, query_slot, q, q_rope, block_cache, block_scales, row_rope_key, key_mask_row, d,
                    r, stride_cs, stride_ss, stride_ks, scale_log2, m_i, l_i, acc, scale_ref,
                    row_slots, block_values, values_from, rope_values,
                    True, HAS_KEY_MASK, IS_FP8, PRECISION, LATENT_DIM, ROPE_DIM, BLOCK_N,
                    HOIST_OFFSETS, PAGED, True, ROPE_SPLIT,
                )
            end = tl.where(straddles, start, end)
            unmasked_end = tl.where(straddles, start, unmasked_end)
        for token_start in range(start, unmasked_end, BLOCK_N):
            m_i, l_i, acc, scale_ref = _token_block(
                token_start, end, query_slot, q, q_rope, block_cache, block_scales, row_rope_key, key_mask_row, d, r,
                stride_cs, stride_ss, stride_ks, scale_log2, m_i, l_i, acc, scale_ref,
                row_slots, block_values, values_from, rope_values,
                False, HAS_KEY_MASK, IS_FP8, PRECISION, LATENT_DIM, ROPE_DIM, BLOCK_N,
                HOIST_OFFSETS, PAGED, False, ROPE_SPLIT,
            )
        for token_start in tl.range(unmasked_end, end, BLOCK_N, num_stages=1):  # too short to pipeline
            m_i, l_i, acc, scale_ref = _token_block(
                token_start, end, query_slot, q, q_rope, block_cache, block_scales, row_rope_key, key_mask_row, d, r,
                stride_cs, stride_ss, stride_ks, scale_log2, m_i, l_i, acc, scale_ref,
                row_slots, block_values, values_from, rope_values,
                True, HAS_KEY_MASK, IS_FP8, PRECISION, LATENT_DIM, ROPE_DIM, BLOCK_N,
                HOIST_OFFSETS, PAGED, False, ROPE_SPLIT,
            )

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        if IS_FP8:
            out = acc * (scale_ref / l_safe)[:, None]
        else:
            out = acc / l_safe[:, None]
        out_offsets = row * stride_on + split * stride_os + new_token[:, None] * stride_ot + branch * stride_ob
        out_offsets += head[:, None] * stride_oh + d[None, :]
        out_mask = row_ok[:, None] & d_ok[None, :]
        if SPLIT:
            tl.store(out_ptr + out_offsets, out, mask=out_mask)
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
            lse_offsets = row * stride_ln + split * stride_ls + new_token * stride_lt + branch * stride_lb + head
            tl.store(lse_ptr + lse_offsets, lse, mask=row_ok)
        else:
            tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _merge_splits_kernel(
        partial_ptr, lse_ptr, out_ptr, rows_per_batch, num_splits,
        LATENT_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Program (batch row and query row, slice of BLOCK_D latent columns): out = sum_s w_s partial_s / sum_s w_s
        with w_s = 2^(lse_s - max lse), in one pass over BLOCK_S splits at a time (all of them for up to BLOCK_S
        splits: one round trip to memory). Partials [bsz, splits, rows_per_batch, d_l] fp32, lse [bsz, splits, rows]."""
        program = tl.program_id(0)
        batch_row = program // rows_per_batch
        inner = program % rows_per_batch
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < LATENT_DIM
        top = tl.full([], float("-inf"), tl.float32)
        total = tl.zeros([], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            split_rows = (batch_row * num_splits + s) * rows_per_batch + inner
            lse = tl.load(lse_ptr + split_rows, mask=s < num_splits, other=float("-inf"))
            partial = tl.load(
                partial_ptr + split_rows.to(tl.int64)[:, None] * LATENT_DIM + d[None, :],
                mask=(s < num_splits)[:, None] & d_ok[None, :],
                other=0.0,
            )
            new_top = tl.maximum(top, tl.max(lse, 0))
            safe_top = tl.where(new_top == float("-inf"), 0.0, new_top)
            rescale = tl.exp2(top - safe_top)
            weights = tl.exp2(lse - safe_top)
            acc = acc * rescale + tl.sum(partial * weights[:, None], 0)
            total = total * rescale + tl.sum(weights, 0)
            top = new_top
        out = acc / tl.where(total == 0.0, 1.0, total)
        tl.store(out_ptr + program.to(tl.int64) * LATENT_DIM + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def launch_plan(
    q_absorbed, q_rope, kv_cache, seq_lens, key_mask, num_groups, scaling, num_splits=0, choices=None, row_starts=None,
    value_pages=None, slots=None,
) -> dict:
    """What `_decode_attention` launches for these inputs: `launch_config`'s tiles, num_splits and programs_per_sm,
    the kernel's compile-time arguments (`constexprs`) and its run-time ones for given partial results
    (`kernel_args(partial, lse, partial_strides, lse_strides, num_splits)`). value_pages and slots: kv_cache holds
    key pages, read in place (`LatentPages`)."""
    bsz, num_new_tokens, num_branches, num_heads, latent_block_dim = q_absorbed.shape
    rope_dim = q_rope.shape[-1]
    heads_per_group = num_heads // num_groups
    num_blocks = num_branches * num_groups
    device = kv_cache.device
    choices = choices or {}
    is_fp8 = kv_cache.dtype == torch.uint8
    paged = slots is not None
    if paged:
        _check_pages(kv_cache, value_pages, row_starts, num_blocks * latent_block_dim + rope_dim)
    # packed rows (continuous batching) hold a different number of tokens at every step: rounded, so that the cached
    # launch configs stay few
    tokens = slots.shape[0] if paged else kv_cache.shape[1]
    capacity = tokens if row_starts is None else triton.next_power_of_2(tokens)
    token_bytes = 2 * kv_cache.shape[-1] * kv_cache.element_size() if paged else kv_cache.shape[2] * kv_cache.element_size()
    config = launch_config(
        bsz, num_groups, heads_per_group, num_branches, latent_block_dim, rope_dim, num_new_tokens, capacity,
        token_bytes, is_fp8, operand_bytes=q_absorbed.element_size(), **choices,
    )
    if is_fp8:  # packed rows of the fp8 cache (`fp8_cache_layout`): the bytes, read as e4m3, float32 and the rope dtype
        layout = fp8_cache_layout(num_blocks, latent_block_dim, rope_dim, q_rope.dtype)
        if kv_cache.shape[-1] != layout.row_bytes:
            raise ValueError(
                f"fp8 latent cache rows of {kv_cache.shape[-1]} bytes, expected {layout.row_bytes} for {num_blocks} "
                f"blocks of {latent_block_dim}, rope {rope_dim} in {q_rope.dtype}"
            )
        latent, scales, rope_key = kv_cache, kv_cache.view(torch.float32), kv_cache.view(q_rope.dtype)
        scales_offset, rope_offset = layout.scales_offset // 4, layout.rope_offset // q_rope.element_size()
    else:
        latent = scales = rope_key = kv_cache
        scales_offset, rope_offset = 0, num_blocks * latent_block_dim
    # the token axis' strides of the (packed) rows; pages are [slots, half] (the row axis has no stride)
    cache_strides = (0, kv_cache.stride(0)) if paged else None
    half = kv_cache.shape[-1] if paged else 0
    has_key_mask = key_mask is not None
    has_row_starts = row_starts is not None
    constexprs = dict(
        NUM_GROUPS=num_groups, NUM_BLOCKS=num_blocks, HEAD_TILES=config["head_tiles"], LATENT_DIM=latent_block_dim,
        ROPE_DIM=rope_dim, BLOCK_H=config["BLOCK_H"], BLOCK_T=config["BLOCK_T"], BLOCK_M=config["BLOCK_M"],
        BLOCK_N=config["BLOCK_N"], BLOCK_D=config["BLOCK_D"], BLOCK_R=max(16, triton.next_power_of_2(rope_dim)),
        HAS_KEY_MASK=has_key_mask, HAS_ROW_STARTS=has_row_starts, IS_FP8=is_fp8,
        PRECISION="ieee" if q_absorbed.dtype == torch.float32 else "tf32",
        HOIST_OFFSETS=config["HOIST_OFFSETS"] and not paged, PAGED=paged, HALF=half,
        # the rope key's columns in the key pages when it straddles both pages, else 0
        ROPE_SPLIT=half - rope_offset if 0 < half - rope_offset < rope_dim else 0,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )

    def kernel_args(partial, lse, partial_strides, lse_strides, num_splits):
        return [
            q_absorbed, q_rope, latent, scales, rope_key, seq_lens, key_mask if has_key_mask else seq_lens,
            row_starts if has_row_starts else seq_lens, value_pages if paged else kv_cache, slots if paged else seq_lens,
            partial, lse, seq_lens.stride(0), *q_absorbed.stride()[:4], *q_rope.stride()[:3],
            *(cache_strides or latent.stride()[:2]), *(cache_strides or scales.stride()[:2]),
            *(cache_strides or rope_key.stride()[:2]), key_mask.stride(0) if has_key_mask else 0,
            *partial_strides, *lse_strides,
            scaling * math.log2(math.e), num_new_tokens, heads_per_group, rope_offset, scales_offset, num_splits,
        ]

    per_sm = None
    num_splits = num_splits or choices.get("num_splits")
    if not num_splits:  # fill the multiprocessors once
        lse_shape = (bsz, 16, num_new_tokens, num_branches, num_heads)  # strides like those of split results
        per_sm = choices.get("programs_per_sm") or _programs_per_sm(
            device,
            kernel_args(torch.float32, torch.float32, _strides(lse_shape + (latent_block_dim,))[:5],
                        _strides(lse_shape)[:4], 2),
            {**constexprs, "SPLIT": True},
        )
        num_splits = max(1, min(per_sm * _num_sms(device.index or 0) // config["programs"], config["max_splits"]))
    return dict(config, num_splits=num_splits, programs_per_sm=per_sm, constexprs=constexprs, kernel_args=kernel_args)


def _check_pages(key_pages, value_pages, row_starts, row_width) -> None:
    """Pages read in place: two [slots, half] tensors of one dtype and row stride holding the rows' halves."""
    if row_starts is None or value_pages is None:
        raise ValueError("latent pages are read through slots per packed row: pass row_starts and the value pages")
    if key_pages.dtype == torch.uint8:
        raise ValueError("latent pages hold the model's dtype: the fp8 cache's packed rows are read as rows")
    if (
        key_pages.dim() != 2 or value_pages.dim() != 2 or 2 * key_pages.shape[1] != row_width
        or key_pages.shape[1] != value_pages.shape[1] or key_pages.dtype != value_pages.dtype
        or key_pages.stride() != value_pages.stride() or key_pages.stride(1) != 1
    ):
        raise ValueError(
            f"latent pages must be two [slots, {row_width // 2}] tensors of one dtype and row stride, unit column "
            f"stride; got keys {tuple(key_pages.shape)} {key_pages.stride()} {key_pages.dtype}, values "
            f"{tuple(value_pages.shape)} {value_pages.stride()} {value_pages.dtype}"
        )


def _decode_attention(
    q_absorbed, q_rope, kv_cache, seq_lens, key_mask, num_groups, scaling, num_splits, choices=None, row_starts=None,
    value_pages=None, slots=None,
):
    """The two launches (split attention, merge); `choices` overrides launch-config defaults (benchmark sweeps)."""
    bsz, num_new_tokens, num_branches, num_heads, latent_block_dim = q_absorbed.shape
    plan = launch_plan(q_absorbed, q_rope, kv_cache, seq_lens, key_mask, num_groups, scaling, num_splits, choices,
                       row_starts, value_pages, slots)
    num_splits = plan["num_splits"]
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
    _mlra_decode_kernel[(plan["programs"], num_splits)](
        *plan["kernel_args"](partial, lse, partial_strides, lse_strides, num_splits), SPLIT=num_splits > 1,
        **plan["constexprs"],
    )
    if num_splits > 1:
        rows_per_batch = num_new_tokens * num_branches * num_heads
        # every split in one load (up to 512 of them), 64 values per thread: narrower column slices for more splits
        block_s = min(triton.next_power_of_2(num_splits), 512)
        block_d = min(plan["BLOCK_D"], max(16, 8192 // block_s))
        _merge_splits_kernel[(bsz * rows_per_batch, triton.cdiv(latent_block_dim, block_d))](
            partial, lse, out, rows_per_batch, num_splits,
            LATENT_DIM=latent_block_dim, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
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
        value_pages: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _decode_attention(
            q_absorbed, q_rope, kv_cache, seq_lens, key_mask, num_groups, scaling, num_splits, row_starts=row_starts,
            value_pages=value_pages, slots=slots,
        )

    @_decode_attention_op.register_fake
    def _(
        q_absorbed, q_rope, kv_cache, seq_lens, key_mask, num_groups, scaling, num_splits, row_starts=None,
        value_pages=None, slots=None,
    ):
        return q_absorbed.new_empty(q_absorbed.shape)


def mlra_decode_attention(
    q_absorbed: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor | LatentPages,
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
    row n from token row_starts[n]; or `LatentPages`, the pages of continuous batching read in place, row n's tokens
    at slots[row_starts[n]:] (no gathered copy). Returns z [bsz, T, B, h, d_l], the softmax-weighted latent before
    W_UV.
    """
    value_pages = slots = None
    if isinstance(kv_cache, LatentPages):
        kv_cache, value_pages, slots = kv_cache
    if q_absorbed.stride(-1) != 1:
        q_absorbed = q_absorbed.contiguous()
    if q_rope.stride(-1) != 1:
        q_rope = q_rope.contiguous()
    if torch.compiler.is_compiling():
        return _decode_attention_op(
            q_absorbed, q_rope, kv_cache, seq_lens, key_mask, num_groups, scaling, num_splits, row_starts, value_pages,
            slots,
        )
    # eager: straight to the launches, without the custom op's dispatch overhead (tens of microseconds per call)
    return _decode_attention(
        q_absorbed, q_rope, kv_cache, seq_lens, key_mask, num_groups, scaling, num_splits, row_starts=row_starts,
        value_pages=value_pages, slots=slots,
    )
