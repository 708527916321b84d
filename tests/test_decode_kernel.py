"""The fused Triton decode kernel against the equations and against the PyTorch paths.

Without a GPU the kernel runs in Triton's interpreter (conftest), with float16/float32 operands (the interpreter
computes bfloat16 dots wrongly); on a GPU the same tests run compiled, bfloat16 included.
"""

import pytest
import torch

from conftest import FAMILY, MLRACache, cache_kwargs, random_tokens, tiny_model
from modeling_mlra import MLRAConfig
from modeling_mlra.mlra_decode_kernel import (
    LatentPages, _decode_attention, fp8_cache_layout, mlra_decode_attention, triton_available,
)
from modeling_mlra.modeling_mlra import dequantize_latent_rows, quantize_latent_rows

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (latent blocks L, softmax branches B): MLA, GLA-2, GLA-4, MLRA-2, MLRA-4
STRUCTURES = {"mla": (1, 1), "gla_2": (2, 1), "gla_4": (4, 1), "mlra_2": (4, 2), "mlra_4": (4, 4)}


def attention_by_the_equations(q_absorbed, q_rope, cache, seq_lens, key_mask, num_groups, scaling):
    """The absorbed decode (docs/design.md) written out per row, new token, branch and head, in float64."""
    bsz, new_tokens, branches, heads, block_dim = q_absorbed.shape
    blocks, heads_per_group, rope_dim = branches * num_groups, heads // num_groups, q_rope.shape[-1]
    out = torch.zeros(q_absorbed.shape, dtype=torch.float64)
    for n in range(bsz):
        length = int(seq_lens[n])
        keys = torch.arange(length)
        rope_key = cache[n, :length, blocks * block_dim : blocks * block_dim + rope_dim].double().cpu()
        for t in range(new_tokens):
            own_slot = length - new_tokens + t
            allowed = keys <= own_slot
            if key_mask is not None:
                allowed &= (key_mask[n, :length].cpu() != 0) | (keys == own_slot)
            for b in range(branches):
                for i in range(heads):
                    block = MLRAConfig.latent_block.__get__(_Structure(num_groups))(b, i // heads_per_group)
                    latent = cache[n, :length, block * block_dim : (block + 1) * block_dim].double().cpu()
                    scores = latent @ q_absorbed[n, t, b, i].double().cpu() + rope_key @ q_rope[n, t, i].double().cpu()
                    probs = torch.softmax((scores * scaling).masked_fill(~allowed, float("-inf")), dim=0)
                    out[n, t, b, i] = probs @ latent
    return out


class _Structure:
    """Just enough of a config for `MLRAConfig.latent_block` (the one place the index math lives)."""

    def __init__(self, num_groups):
        self.num_head_groups = num_groups


def random_inputs(member, bsz, new_tokens, heads, block_dim, rope_dim, capacity, dtype, seed):
    blocks, branches = STRUCTURES[member]
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(shape, generator=generator).to(dtype).to(DEVICE)

    q_absorbed = draw(bsz, new_tokens, branches, heads, block_dim)
    q_rope = draw(bsz, new_tokens, heads, rope_dim)
    cache = draw(bsz, capacity, blocks * block_dim + rope_dim)
    return q_absorbed, q_rope, cache, blocks // branches


def relative_error(out, reference):
    return ((out.double().cpu() - reference).norm() / reference.norm()).item()


TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("member", STRUCTURES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_the_equations_on_ragged_rows_with_left_padding(member, dtype):
    q_absorbed, q_rope, cache, groups = random_inputs(member, 3, 1, 4, 16, 8, 200, dtype, seed=1)
    seq_lens = torch.tensor([200, 131, 7], device=DEVICE)
    key_mask = torch.ones(3, 200, dtype=torch.long, device=DEVICE)
    key_mask[1, :20] = 0  # left padding
    key_mask[2, :3] = 0
    out = mlra_decode_attention(q_absorbed, q_rope, cache, seq_lens, key_mask, groups, 0.25, num_splits=3)
    reference = attention_by_the_equations(q_absorbed, q_rope, cache, seq_lens, key_mask, groups, 0.25)
    assert relative_error(out, reference) < TOLERANCE[dtype]


@pytest.mark.parametrize("member", STRUCTURES)
@pytest.mark.parametrize("new_tokens", [2, 5, 16])
def test_kernel_applies_the_causal_rule_among_several_new_tokens(member, new_tokens):
    q_absorbed, q_rope, cache, groups = random_inputs(member, 2, new_tokens, 4, 8, 4, 90, torch.float32, seed=2)
    seq_lens = torch.tensor([90, 40], device=DEVICE)
    out = mlra_decode_attention(q_absorbed, q_rope, cache, seq_lens, None, groups, 0.3)
    reference = attention_by_the_equations(q_absorbed, q_rope, cache, seq_lens, None, groups, 0.3)
    assert relative_error(out, reference) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("num_splits", [1, 2, 7, 24])
def test_any_number_of_sequence_splits_gives_the_same_attention(num_splits):
    """Splits that divide the length, that do not, and more splits than blocks of tokens (empty slices)."""
    q_absorbed, q_rope, cache, groups = random_inputs("mlra_2", 2, 1, 4, 16, 8, 256, torch.float32, seed=3)
    seq_lens = torch.tensor([256, 97], device=DEVICE)
    out = mlra_decode_attention(q_absorbed, q_rope, cache, seq_lens, None, groups, 0.2, num_splits=num_splits)
    reference = attention_by_the_equations(q_absorbed, q_rope, cache, seq_lens, None, groups, 0.2)
    assert relative_error(out, reference) < TOLERANCE[torch.float32]


def test_kernel_reads_only_the_valid_tokens_of_a_static_buffer():
    """Tokens past a row's length (a static cache's unused capacity) never reach the result, even if not finite."""
    q_absorbed, q_rope, cache, groups = random_inputs("mlra_4", 2, 1, 4, 16, 8, 128, torch.float32, seed=4)
    seq_lens = torch.tensor([70, 33], device=DEVICE)
    poisoned = cache.clone()
    poisoned[0, 70:] = float("nan")
    poisoned[1, 33:] = float("inf")
    out = mlra_decode_attention(q_absorbed, q_rope, poisoned, seq_lens, None, groups, 0.2, num_splits=2)
    reference = attention_by_the_equations(q_absorbed, q_rope, cache, seq_lens, None, groups, 0.2)
    assert relative_error(out, reference) < TOLERANCE[torch.float32]


def test_kernel_handles_the_published_head_and_latent_sizes():
    """24 heads (not a power of two), latent blocks of 128 and a rope key of 64, as in the ~2.9B models."""
    q_absorbed, q_rope, cache, groups = random_inputs("mlra_4", 1, 1, 24, 128, 64, 96, torch.float16, seed=5)
    seq_lens = torch.tensor([96], device=DEVICE)
    out = mlra_decode_attention(q_absorbed, q_rope, cache, seq_lens, None, groups, 192**-0.5, num_splits=2)
    reference = attention_by_the_equations(q_absorbed, q_rope, cache, seq_lens, None, groups, 192**-0.5)
    assert relative_error(out, reference) < TOLERANCE[torch.float16]


def _masked_ragged_inputs(member, new_tokens, dtype, seed, fp8=False):
    """Ragged rows with left padding and several new tokens; fp8: the packed rows and the values they hold."""
    q_absorbed, q_rope, cache, groups = random_inputs(member, 3, new_tokens, 4, 16, 8, 200, dtype, seed)
    seq_lens = torch.tensor([200, 131, 9], device=DEVICE)
    key_mask = torch.ones(3, 200, dtype=torch.long, device=DEVICE)
    key_mask[1, :20] = 0
    key_mask[2, :3] = 0
    held = cache
    if fp8:
        cache = quantize_latent_rows(cache, 16, 8)
        held = dequantize_latent_rows(cache, STRUCTURES[member][0], 16, 8, dtype)
    return q_absorbed, q_rope, cache, held, seq_lens, key_mask, groups


@pytest.mark.parametrize("hoist_offsets", [0, 1])
def test_token_loops_with_and_without_hoisted_address_offsets_give_the_same_attention(hoist_offsets):
    """The address offsets within a token block computed once outside the loop (the default for 16-bit caches with
    blocks up to 128 wide) or in every block, against the equations."""
    q_absorbed, q_rope, cache, held, seq_lens, key_mask, groups = _masked_ragged_inputs("mlra_2", 5, torch.float16, 33)
    choices = {"HOIST_OFFSETS": hoist_offsets}
    out = _decode_attention(q_absorbed, q_rope, cache, seq_lens, key_mask, groups, 0.3, 3, choices)
    reference = attention_by_the_equations(q_absorbed, q_rope, held, seq_lens, key_mask, groups, 0.3)
    assert relative_error(out, reference) < TOLERANCE[torch.float16]


FP8_DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("member", STRUCTURES)
@pytest.mark.parametrize("dtype", FP8_DTYPES)
@pytest.mark.parametrize("new_tokens", [1, 5])
def test_kernel_on_an_fp8_cache_matches_the_equations_on_its_dequantized_values(member, dtype, new_tokens):
    """The kernel reads the packed fp8 rows (e4m3 latent, a float32 scale per token and block, the rope key in the
    model's dtype) and gives the attention of the values they hold: ragged rows, left padding, several new tokens."""
    q_absorbed, q_rope, cache, groups = random_inputs(member, 3, new_tokens, 4, 16, 8, 200, dtype, seed=21)
    cache = cache * torch.linspace(0.05, 20, cache.shape[-1], device=DEVICE, dtype=dtype)  # blocks of unlike ranges
    blocks, _ = STRUCTURES[member]
    rows = quantize_latent_rows(cache, 16, 8)
    seq_lens = torch.tensor([200, 131, 9], device=DEVICE)
    key_mask = torch.ones(3, 200, dtype=torch.long, device=DEVICE)
    key_mask[1, :20] = 0
    key_mask[2, :3] = 0
    out = mlra_decode_attention(q_absorbed, q_rope, rows, seq_lens, key_mask, groups, 0.1, num_splits=3)
    held = dequantize_latent_rows(rows, blocks, 16, 8, dtype)
    reference = attention_by_the_equations(q_absorbed, q_rope, held, seq_lens, key_mask, groups, 0.1)
    assert relative_error(out, reference) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", FP8_DTYPES)
def test_fp8_probabilities_keep_their_precision_for_small_and_growing_scales(dtype):
    """The probabilities times the fp8 scales enter the second dot divided by the largest scale so far: latent values
    of 1e-5 ... 1e-3, growing along the sequence, would otherwise put fp16 probabilities into its subnormal range
    (a relative error of 2e-2 measured without the division)."""
    q_absorbed, q_rope, cache, groups = random_inputs("mlra_2", 2, 2, 4, 16, 8, 300, dtype, seed=25)
    magnitude = torch.ones(300, cache.shape[-1], device=DEVICE)
    magnitude[:, :64] = torch.logspace(-5, -3, 300, device=DEVICE)[:, None]  # the latent blocks, not the rope key
    cache = (cache.float() * magnitude).to(dtype)
    q_absorbed = q_absorbed * 3000  # latent scores about 1
    rows = quantize_latent_rows(cache, 16, 8)
    seq_lens = torch.tensor([300, 170], device=DEVICE)
    out = mlra_decode_attention(q_absorbed, q_rope, rows, seq_lens, None, groups, 0.1, num_splits=2)
    layout = fp8_cache_layout(4, 16, 8, dtype)  # the values the cache holds, in float32
    values = rows[..., :64].view(torch.float8_e4m3fn).float().unflatten(-1, (4, 16))
    scales = rows[..., layout.scales_offset : layout.scales_offset + 16].view(torch.float32)
    held = torch.cat([(values * scales[..., None]).flatten(-2), cache[..., 64:].float()], dim=-1)
    reference = attention_by_the_equations(q_absorbed, q_rope, held, seq_lens, None, groups, 0.1)
    assert relative_error(out, reference) < TOLERANCE[dtype]


def _decode_step_by_step(model, input_ids, attention_mask, prefill, static, cache_dtype=None):
    cache = MLRACache(model.config, max_cache_len=input_ids.shape[1] if static else None, dtype=cache_dtype)
    logits = [model(input_ids[:, :prefill], attention_mask=attention_mask[:, :prefill], **cache_kwargs(cache)).logits]
    for end in range(prefill + 1, input_ids.shape[1] + 1):
        step = model(input_ids[:, end - 1 : end], attention_mask=attention_mask[:, :end], **cache_kwargs(cache))
        logits.append(step.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize(
    "member, static",
    [(member, False) for member in FAMILY] + [("mlra_4", True), ("gla_2_interleaved_rope", True)],
)
def test_model_decoding_through_the_kernel_matches_the_pytorch_absorbed_path(member, static):
    input_ids = random_tokens((2, 8), seed=6).to(DEVICE)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # a left-padded row
    logits = {}
    for decode_kernel in ("triton", "torch"):
        model = tiny_model(seed=7, **FAMILY[member], decode_kernel=decode_kernel).to(DEVICE)
        logits[decode_kernel] = _decode_step_by_step(model, input_ids, attention_mask, prefill=5, static=static)
    real = attention_mask.bool()
    torch.testing.assert_close(logits["triton"][real], logits["torch"][real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("member, static", [("mla", False), ("gla_2", True), ("mlra_2", False), ("mlra_4", True)])
def test_model_decoding_on_an_fp8_cache_through_the_kernel_matches_the_pytorch_path(member, static):
    input_ids = random_tokens((2, 8), seed=22).to(DEVICE)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    logits = {}
    for decode_kernel in ("triton", "torch"):
        model = tiny_model(seed=23, **FAMILY[member], decode_kernel=decode_kernel).to(DEVICE)
        logits[decode_kernel] = _decode_step_by_step(
            model, input_ids, attention_mask, prefill=5, static=static, cache_dtype=torch.float8_e4m3fn
        )
    real = attention_mask.bool()
    torch.testing.assert_close(logits["triton"][real], logits["torch"][real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("member", ["mla", "mlra_4"])
def test_model_decoding_through_the_kernel_matches_the_expanded_full_forward(member):
    input_ids = random_tokens((1, 7), seed=8).to(DEVICE)
    model = tiny_model(seed=9, **FAMILY[member], decode_kernel="triton").to(DEVICE)
    stepwise = _decode_step_by_step(model, input_ids, torch.ones_like(input_ids), prefill=2, static=False)
    full = model(input_ids, use_cache=False).logits
    torch.testing.assert_close(stepwise, full, rtol=1e-4, atol=1e-4)


def test_assisted_style_multi_token_steps_through_the_kernel_match_the_full_forward():
    input_ids = random_tokens((1, 14), seed=10).to(DEVICE)
    model = tiny_model(seed=11, decode_kernel="triton", absorbed_max_query_len=4).to(DEVICE)
    cache = MLRACache(model.config)
    chunks = [model(input_ids[:, start : start + 4], **cache_kwargs(cache)).logits for start in range(0, 14, 4)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), model(input_ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)


def test_kernel_op_is_captured_by_torch_compile_without_graph_breaks():
    q_absorbed, q_rope, cache, groups = random_inputs("mlra_2", 1, 1, 4, 16, 8, 64, torch.float32, seed=12)
    seq_lens = torch.tensor([50], device=DEVICE)

    def decode(q_absorbed, q_rope, cache, seq_lens):
        return mlra_decode_attention(q_absorbed, q_rope, cache, seq_lens, None, groups, 0.2) * 2

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(decode)(q_absorbed, q_rope, cache, seq_lens)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(decode, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q_absorbed, q_rope, cache, seq_lens), decode(q_absorbed, q_rope, cache, seq_lens))


def test_a_static_cache_decode_step_through_the_kernel_compiles_to_one_graph():
    model = tiny_model(seed=14, decode_kernel="triton").to(DEVICE)
    input_ids = random_tokens((2, 6), seed=15).to(DEVICE)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    cache = MLRACache(model.config, max_cache_len=16)
    model(input_ids[:, :5], attention_mask=attention_mask[:, :5], **cache_kwargs(cache))
    step_mask = model.create_masks_for_generate(
        model.config, model.get_input_embeddings()(input_ids[:, 5:]), attention_mask, **cache_kwargs(cache)
    )
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model.forward)(
        input_ids[:, 5:], attention_mask=step_mask, position_ids=torch.tensor([[5], [3]], device=DEVICE),
        **cache_kwargs(cache),
    )
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronisations are a GPU matter")
def test_a_decode_step_through_the_kernel_never_waits_for_the_gpu():
    model = tiny_model(seed=16).to(DEVICE)  # decode_kernel="auto": the kernel on CUDA
    input_ids = random_tokens((2, 9), seed=17).to(DEVICE)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    cache = MLRACache(model.config)
    model(input_ids[:, :8], attention_mask=attention_mask[:, :8], **cache_kwargs(cache))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(input_ids[:, 8:], attention_mask=attention_mask, **cache_kwargs(cache))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_forcing_the_kernel_for_an_unsupported_shape_names_the_reason():
    model = tiny_model(qk_rope_head_dim=132, decode_kernel="triton")
    with pytest.raises(ValueError, match="decode_kernel='triton'.*rope 132"):
        model(random_tokens((1, 3)), **cache_kwargs(MLRACache(model.config)))


def test_an_unknown_decode_kernel_setting_is_refused():
    with pytest.raises(ValueError, match="decode_kernel"):
        MLRAConfig(decode_kernel="cuda")


def test_static_generate_through_the_kernel_gives_the_pytorch_path_tokens_for_left_padded_rows():
    # generate() hands the kernel only the padding ([bsz, 1, 1, capacity] booleans), the PyTorch path the full mask
    input_ids = random_tokens((2, 7), seed=18).to(DEVICE) + 1
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    outputs = {}
    for decode_kernel in ("triton", "torch"):
        model = tiny_model(seed=19, decode_kernel=decode_kernel).to(DEVICE)
        outputs[decode_kernel] = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
            cache_implementation="static",
        )
    assert torch.equal(outputs["triton"], outputs["torch"])


@pytest.mark.parametrize("member", ["mla", "mlra_4"])
def test_rows_packed_along_the_tokens_give_the_attention_of_separate_rows(member):
    """row_starts (continuous batching): rows of different lengths packed one after another in one [1, total, width]
    cache read the same tokens as when each has a row of its own."""
    q_absorbed, q_rope, cache, groups = random_inputs(member, 3, 1, 4, 16, 8, 150, torch.float32, seed=9)
    seq_lens = torch.tensor([150, 61, 5], device=DEVICE)
    packed = torch.cat([cache[n, : int(length)] for n, length in enumerate(seq_lens)])[None]
    row_starts = torch.cat([seq_lens.new_zeros(1), seq_lens.cumsum(0)[:-1]])
    out = mlra_decode_attention(q_absorbed, q_rope, packed, seq_lens, None, groups, 0.25, num_splits=2,
                                row_starts=row_starts)
    reference = attention_by_the_equations(q_absorbed, q_rope, cache, seq_lens, None, groups, 0.25)
    assert relative_error(out, reference) < TOLERANCE[torch.float32]


def rows_in_pages(cache, seq_lens, page_size, seed):
    """The rows of cache [bsz, capacity, width] (seq_lens[n] tokens of row n) laid out as continuous batching keeps
    them: pages of page_size tokens, each row's pages in shuffled order with unused pages between them, the first half
    of every token's row in the key pages and the second in the value pages; the unused slots hold noise. Row 1 shares
    row 0's first page (a shared prefix: the same tokens). Returns (LatentPages, row_starts)."""
    generator = torch.Generator().manual_seed(seed)
    half = cache.shape[-1] // 2
    pages_per_row = [-(-int(length) // page_size) for length in seq_lens]
    page_order = torch.randperm(3 * sum(pages_per_row), generator=generator).tolist()
    key_pages = torch.randn(len(page_order) * page_size, half, generator=generator).to(cache)
    value_pages = torch.randn(len(page_order) * page_size, half, generator=generator).to(cache)
    slots = []
    for n, length in enumerate(seq_lens.tolist()):
        pages = [page_order.pop() for _ in range(pages_per_row[n])]
        if n == 1:
            cache[1, :page_size] = cache[0, :page_size]
            pages[0] = slots[0][0] // page_size
        row_slots = torch.cat([torch.arange(page * page_size, (page + 1) * page_size) for page in pages])[:length]
        key_pages[row_slots] = cache[n, :length, :half]
        value_pages[row_slots] = cache[n, :length, half:]
        slots.append(row_slots)
    row_starts = torch.cat([seq_lens.new_zeros(1), seq_lens.cumsum(0)[:-1]])
    return LatentPages(key_pages, value_pages, torch.cat(slots).to(DEVICE)), row_starts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "member, block_dim, rope_dim",
    # rows of 4 x 16 + 8 (block 2 straddles the key and value pages), 2 x 16 + 8 (block 1 does), 1 x 4 + 8 (the
    # rope key does), 4 x 16 + 64 (the pages split the row between block 3 and the rope key)
    [("mlra_4", 16, 8), ("gla_2", 16, 8), ("mla", 4, 8), ("mlra_2", 16, 64)],
)
def test_kernel_reading_latent_pages_in_place_matches_the_gathered_rows_and_the_equations(
    member, block_dim, rope_dim, dtype
):
    """LatentPages (continuous batching): each token's row read from its slot in the key and the value pages, the pages
    out of order with holes between them, a prefix shared by two rows, ragged rows, several new tokens: the attention
    of the rows gathered into one packed tensor, and of the equations."""
    q_absorbed, q_rope, cache, groups = random_inputs(member, 3, 3, 4, block_dim, rope_dim, 150, dtype, seed=11)
    seq_lens = torch.tensor([150, 61, 5], device=DEVICE)
    pages, row_starts = rows_in_pages(cache, seq_lens, page_size=8, seed=12)
    out = mlra_decode_attention(q_absorbed, q_rope, pages, seq_lens, None, groups, 0.25, num_splits=2,
                                row_starts=row_starts)
    gathered = mlra_decode_attention(q_absorbed, q_rope, pages.gather(), seq_lens, None, groups, 0.25, num_splits=2,
                                     row_starts=row_starts)
    reference = attention_by_the_equations(q_absorbed, q_rope, cache, seq_lens, None, groups, 0.25)
    assert relative_error(out, gathered.double().cpu()) < TOLERANCE[dtype] / 10  # equal in the interpreter
    assert relative_error(out, reference) < TOLERANCE[dtype]


def test_kernel_reads_each_token_from_the_slot_it_is_given():
    """One slot of the read index pointing at another token's row changes the attention of that row only."""
    q_absorbed, q_rope, cache, groups = random_inputs("mlra_4", 2, 1, 4, 16, 8, 40, torch.float32, seed=13)
    seq_lens = torch.tensor([40, 40], device=DEVICE)
    pages, row_starts = rows_in_pages(cache, seq_lens, page_size=8, seed=14)
    right = mlra_decode_attention(q_absorbed, q_rope, pages, seq_lens, None, groups, 0.25, row_starts=row_starts)
    slots = pages.slots.clone()
    slots[45] = slots[3]  # row 1's sixth token read from row 0's fourth
    wrong = mlra_decode_attention(q_absorbed, q_rope, pages._replace(slots=slots), seq_lens, None, groups, 0.25,
                                  row_starts=row_starts)
    assert torch.equal(wrong[0], right[0])
    assert relative_error(wrong[1], right[1].double().cpu()) > 1e-3


def test_latent_pages_of_another_width_than_the_row_are_refused():
    q_absorbed, q_rope, cache, groups = random_inputs("mla", 1, 1, 4, 16, 8, 8, torch.float32, seed=15)
    pages = LatentPages(cache[0, :, :10], cache[0, :, 10:], torch.arange(8, device=DEVICE))
    with pytest.raises(ValueError, match="latent pages must be two"):
        mlra_decode_attention(q_absorbed, q_rope, pages, torch.tensor([8], device=DEVICE), None, groups, 0.25,
                              row_starts=torch.zeros(1, dtype=torch.long, device=DEVICE))
