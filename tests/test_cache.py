"""The compressed latent cache (MLRACache): decoding through it must give the logits of a full forward, while it
holds only d_c + d_r values per token and layer."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import FAMILY, REFERENCE_VARIANTS, cache_kwargs, output_cache, random_tokens, reference, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from modeling_mlra import MLRACache
from modeling_mlra.modeling_mlra import MLRALatentCacheLayer, attention_mask_for_slots

ATOL = 1e-4


def decode_in_steps(model, input_ids, steps, cache=None, attention_mask=None):
    """Feed input_ids through one cache in consecutive chunks of the given lengths; return the concatenated logits."""
    cache = cache if cache is not None else MLRACache(model.config)
    logits, start = [], 0
    for length in steps:
        end = start + length
        mask = None if attention_mask is None else attention_mask[:, :end]
        logits.append(model(input_ids[:, start:end], attention_mask=mask, **cache_kwargs(cache)).logits)
        start = end
    return torch.cat(logits, dim=1)


def full_forward(model, input_ids, attention_mask=None):
    return model(input_ids, attention_mask=attention_mask, use_cache=False).logits


# --- the authors' reference checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", REFERENCE_VARIANTS)
def test_prefill_then_token_by_token_decoding_reproduces_reference_logits(variant):
    model, expected = reference(variant)
    input_ids = expected["input_ids"]
    logits = decode_in_steps(model, input_ids, [5] + [1] * (input_ids.shape[1] - 5))
    torch.testing.assert_close(logits, expected["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", REFERENCE_VARIANTS)
def test_greedy_generate_with_cache_reproduces_reference_tokens(variant):
    model, expected = reference(variant)
    prompt, tokens = expected["greedy_prompt"], expected["greedy_tokens"]
    output = model.generate(
        prompt, max_new_tokens=tokens.shape[1] - prompt.shape[1], do_sample=False, return_dict_in_generate=True
    )
    assert isinstance(output_cache(output), MLRACache)
    assert torch.equal(output.sequences, tokens)


# --- what the cache holds -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("member", ["mla", "gla_2", "mlra_4"])
def test_cache_holds_latent_and_rope_key_bytes_per_token_per_layer(member, dtype):
    model = tiny_model(dtype=dtype, **FAMILY[member])
    config = model.config
    cache = MLRACache(config)
    model(random_tokens((3, 10)), **cache_kwargs(cache))

    expected_bytes = (config.kv_lora_rank + config.qk_rope_head_dim) * torch.finfo(dtype).bits // 8
    assert [layer.bytes_per_token for layer in cache.layers] == [expected_bytes] * config.num_hidden_layers
    assert cache.bytes_per_token == expected_bytes * config.num_hidden_layers
    for layer in cache.layers:
        # The only tensor held is the latent buffer: no per-head keys or values, no second copy.
        tensors = {name: value for name, value in vars(layer).items() if isinstance(value, torch.Tensor)}
        assert list(tensors) == ["buffer"]
        assert layer.buffer.dtype == dtype
        assert layer.buffer.shape[0] == 3 and layer.buffer.shape[2] == config.kv_lora_rank + config.qk_rope_head_dim
    assert cache.nbytes == sum(layer.buffer.numel() * layer.buffer.element_size() for layer in cache.layers)


def test_dynamic_cache_grows_by_doubling_and_appends_in_place():
    layer = MLRALatentCacheLayer()
    width = 20
    capacities, reallocations, pointer = [], 0, None
    for step in range(1500):
        returned = layer.update(torch.full((2, 1, width), float(step)))
        if layer.buffer.data_ptr() != pointer:
            reallocations += 1
            capacities.append(layer.buffer.shape[1])
            pointer = layer.buffer.data_ptr()
        assert returned.shape == (2, step + 1, width)
    assert capacities == [256, 512, 1024, 2048]
    assert reallocations == 4
    # Growing kept every token in order.
    assert torch.equal(returned[0, :, 0], torch.arange(1500, dtype=torch.float32))


def test_dynamic_cache_prefill_longer_than_initial_capacity_allocates_it_at_once():
    layer = MLRALatentCacheLayer()
    layer.update(torch.zeros(1, 300, 4))
    assert layer.buffer.shape[1] == 300
    pointer = layer.buffer.data_ptr()
    layer.update(torch.zeros(1, 1, 4))
    assert layer.buffer.shape[1] == 600 and layer.buffer.data_ptr() != pointer
    pointer = layer.buffer.data_ptr()
    for _ in range(299):
        layer.update(torch.zeros(1, 1, 4))
    assert layer.buffer.data_ptr() == pointer and layer.get_seq_length() == 600


def test_model_decoding_reallocates_the_cache_only_when_capacity_doubles():
    model = tiny_model(num_hidden_layers=1)
    cache = MLRACache(model.config)
    tokens = random_tokens((1, 300))
    model(tokens[:, :4], **cache_kwargs(cache))
    pointers = set()
    for position in range(4, 300):
        model(tokens[:, position : position + 1], **cache_kwargs(cache))
        pointers.add(cache.layers[0].buffer.data_ptr())
    assert len(pointers) == 2
    assert cache.layers[0].buffer.shape[1] == 512


# --- absorbed (decode) and expanded (prefill) attention are one function ------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("member", list(FAMILY))
def test_absorbed_and_expanded_attention_agree_on_random_inputs(member, attn_implementation):
    model = tiny_model(**FAMILY[member])
    model.config._attn_implementation = attn_implementation
    config = model.config
    attention = model.model.layers[0].self_attn
    bsz, q_len, kv_len, heads = 2, 3, 9, config.num_attention_heads
    generator = torch.Generator().manual_seed(1)
    q_nope = torch.randn(bsz, q_len, heads, config.qk_nope_head_dim, generator=generator)
    q_rope = torch.randn(bsz, q_len, heads, config.qk_rope_head_dim, generator=generator)
    kv_states = torch.randn(bsz, kv_len, config.kv_lora_rank + config.qk_rope_head_dim, generator=generator)
    padding = torch.ones(bsz, kv_len, dtype=torch.long)
    padding[1, :2] = 0
    mask = attention_mask_for_slots(padding, torch.arange(kv_len - q_len, kv_len), kv_len, torch.float32)

    absorbed, _ = attention.absorbed_attention(q_nope, q_rope, kv_states, mask)
    expanded, _ = attention.expanded_attention(q_nope, q_rope, kv_states, mask)
    assert absorbed.shape == (bsz, q_len, heads, config.v_head_dim)
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-5)


class LargestNewTensor(TorchDispatchMode):
    """Records the largest tensor any operation returns while active."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_absorbed_attention_never_copies_the_up_projection_per_sequence():
    model = tiny_model(qk_nope_head_dim=32, v_head_dim=32)  # W_UK, W_UV much larger than a step's activations
    attention, config = model.model.layers[0].self_attn, model.config
    bsz, heads = 8, config.num_attention_heads
    q_nope = torch.randn(bsz, 1, heads, config.qk_nope_head_dim)
    q_rope = torch.randn(bsz, 1, heads, config.qk_rope_head_dim)
    kv_states = torch.randn(bsz, 5, config.kv_lora_rank + config.qk_rope_head_dim)
    with LargestNewTensor() as recorder:
        attention.absorbed_attention(q_nope, q_rope, kv_states, None)
    assert recorder.largest <= attention.kv_b_proj.weight.numel()


@pytest.mark.parametrize("member", list(FAMILY))
def test_decoding_through_absorbed_path_matches_expanded_path(member):
    input_ids = random_tokens((2, 12))
    logits = {}
    for name, absorbed_max_query_len in [("absorbed", 10_000), ("expanded", 0)]:
        model = tiny_model(absorbed_max_query_len=absorbed_max_query_len, **FAMILY[member])
        logits[name] = decode_in_steps(model, input_ids, [7, 1, 3, 1])
    torch.testing.assert_close(logits["absorbed"], logits["expanded"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits["absorbed"], full_forward(model, input_ids), atol=ATOL, rtol=0)


def test_bfloat16_decoding_is_as_accurate_as_a_bfloat16_full_forward():
    input_ids = random_tokens((2, 16))
    exact = full_forward(tiny_model(), input_ids)
    model = tiny_model(dtype=torch.bfloat16)
    decoded = decode_in_steps(model, input_ids, [6] + [1] * 10).float()
    full = full_forward(model, input_ids).float()
    # bf16 keeps 8 mantissa bits; the absorbed path reorders the products but must not lose more than that.
    assert (decoded - exact).abs().mean() <= 1.25 * (full - exact).abs().mean()
    assert (decoded - exact).abs().max() <= 0.1 * exact.abs().max()
    assert (decoded.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9


# --- prefill on top of a cache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("member", ["mla", "gla_2", "mlra_2", "mlra_4"])
@pytest.mark.parametrize(
    "steps",
    [
        pytest.param([6, 1, 1, 9, 1, 2], id="multi_turn"),
        pytest.param([7, 7, 5, 1], id="chunked_prefill_longer_than_absorbed_max"),
        pytest.param([3, 4, 2, 11], id="chunks_around_absorbed_max"),
    ],
)
def test_prefill_on_top_of_a_cache_equals_one_full_forward(member, steps):
    model = tiny_model(**FAMILY[member])  # absorbed_max_query_len=4
    input_ids = random_tokens((2, sum(steps)))
    logits = decode_in_steps(model, input_ids, steps)
    torch.testing.assert_close(logits, full_forward(model, input_ids), atol=ATOL, rtol=0)


def test_an_explicit_all_ones_attention_mask_changes_nothing():
    model = tiny_model()
    input_ids = random_tokens((2, 14))
    with_mask = decode_in_steps(model, input_ids, [6, 1, 7], attention_mask=torch.ones_like(input_ids))
    torch.testing.assert_close(with_mask, full_forward(model, input_ids), atol=ATOL, rtol=0)


def test_an_attention_mask_of_only_the_new_tokens_is_refused():
    model = tiny_model()
    cache = MLRACache(model.config)
    model(random_tokens((1, 6)), **cache_kwargs(cache))
    with pytest.raises(ValueError, match="cache holds 6"):
        model(random_tokens((1, 1)), attention_mask=torch.ones(1, 1, dtype=torch.long), **cache_kwargs(cache))


def test_left_padded_rows_decode_like_their_unpadded_selves():
    model = tiny_model()
    input_ids = random_tokens((2, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    logits = decode_in_steps(model, input_ids, [6, 1, 1, 4], attention_mask=attention_mask)
    torch.testing.assert_close(logits[0], full_forward(model, input_ids[:1])[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1, 4:], full_forward(model, input_ids[1:, 4:])[0], atol=ATOL, rtol=0)


# --- cache operations ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_crop_forgets_the_last_tokens(static):
    model = tiny_model()
    input_ids = random_tokens((2, 14))
    cache = MLRACache(model.config, max_cache_len=32 if static else None)
    model(input_ids[:, :10], **cache_kwargs(cache))
    cache.crop(-4)  # negative: remove that many
    assert cache.get_seq_length() == 6
    cache.crop(5)  # positive (legacy): keep that many
    assert cache.get_seq_length() == 5
    cache.crop(9)  # keeping more than there is keeps everything
    assert cache.get_seq_length() == 5
    logits = model(input_ids[:, 5:], **cache_kwargs(cache)).logits
    torch.testing.assert_close(logits, full_forward(model, input_ids)[:, 5:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_crop_zero_removes_nothing(static):
    """generate() calls `crop(-n_rejected)` after every assisted step, so `crop(0)` must keep the cache whole."""
    model = tiny_model()
    cache = MLRACache(model.config, max_cache_len=32 if static else None)
    model(random_tokens((2, 10)), **cache_kwargs(cache))
    cache.crop(0)
    assert cache.get_seq_length() == 10


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_reorder_cache_permutes_the_batch(static):
    model = tiny_model()
    input_ids = random_tokens((3, 10))
    cache = MLRACache(model.config, max_cache_len=16 if static else None)
    model(input_ids[:, :8], **cache_kwargs(cache))
    order = torch.tensor([2, 0, 0])
    cache.reorder_cache(order)
    logits = model(input_ids[order, 8:], **cache_kwargs(cache)).logits
    torch.testing.assert_close(logits, full_forward(model, input_ids[order])[:, 8:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_batch_repeat_interleave_repeats_each_row(static):
    model = tiny_model()
    input_ids = random_tokens((2, 9))
    cache = MLRACache(model.config, max_cache_len=12 if static else None)
    model(input_ids[:, :7], **cache_kwargs(cache))
    cache.batch_repeat_interleave(3)
    repeated = input_ids.repeat_interleave(3, dim=0)
    logits = model(repeated[:, 7:], **cache_kwargs(cache)).logits
    torch.testing.assert_close(logits, full_forward(model, repeated)[:, 7:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_batch_select_indices_keeps_the_chosen_rows(static):
    model = tiny_model()
    input_ids = random_tokens((4, 9))
    cache = MLRACache(model.config, max_cache_len=12 if static else None)
    model(input_ids[:, :7], **cache_kwargs(cache))
    rows = torch.tensor([3, 1])
    cache.batch_select_indices(rows)
    logits = model(input_ids[rows, 7:], **cache_kwargs(cache)).logits
    torch.testing.assert_close(logits, full_forward(model, input_ids[rows])[:, 7:], atol=ATOL, rtol=0)


def test_static_buffer_keeps_its_address_through_batch_changes_and_a_compiled_step_never_recompiles():
    """Contrastive search's pattern: repeat each row, decode, keep one row per sequence, decode, and again."""
    model = tiny_model(num_hidden_layers=1)
    cache = MLRACache(model.config, max_cache_len=12)
    model(random_tokens((2, 4)), **cache_kwargs(cache))
    # recompiling is decided by dynamo's guards, whatever the backend: the eager one compiles in no time
    step = torch.compile(model.forward, backend="eager", fullgraph=True, dynamic=False)

    def repeat_then_select(seed):
        cache.batch_repeat_interleave(2)
        step(random_tokens((4, 1), seed=seed), **cache_kwargs(cache))
        cache.batch_select_indices(torch.tensor([1, 2]))
        step(random_tokens((2, 1), seed=seed + 1), **cache_kwargs(cache))

    repeat_then_select(seed=0)  # compiles the step at batch 4 and 2; the buffer grows to 4 rows, once
    buffer = cache.layers[0].buffer
    with torch._dynamo.config.patch(error_on_recompile=True):
        repeat_then_select(seed=2)
        repeat_then_select(seed=4)
    assert cache.layers[0].buffer is buffer and buffer.shape[0] == 4
    assert int(cache.get_seq_length()) == 10


def test_a_full_static_cache_refuses_more_tokens_naming_max_cache_len():
    model = tiny_model()
    cache = MLRACache(model.config, max_cache_len=8)
    model(random_tokens((1, 6)), **cache_kwargs(cache))
    with pytest.raises(ValueError, match=r"max_cache_len=8\) and cannot take 3 more token.*larger `max_cache_len`"):
        model(random_tokens((1, 3)), **cache_kwargs(cache))


def test_a_full_static_cache_is_refused_by_a_device_assert_when_compiling(monkeypatch):
    """Under torch.compile (and on accelerators) the check is an asynchronous device assert with the same message."""
    model = tiny_model()
    cache = MLRACache(model.config, max_cache_len=8)
    model(random_tokens((1, 6)), **cache_kwargs(cache))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match=r"max_cache_len=8\) and cannot take 3 more token"):
        model(random_tokens((1, 3)), **cache_kwargs(cache))


def test_reset_empties_the_cache_for_a_new_sequence():
    model = tiny_model()
    cache = MLRACache(model.config)
    model(random_tokens((2, 9), seed=5), **cache_kwargs(cache))
    cache.reset()
    assert cache.get_seq_length() == 0
    input_ids = random_tokens((2, 9))
    torch.testing.assert_close(
        decode_in_steps(model, input_ids, [5, 1, 3], cache=cache), full_forward(model, input_ids), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_static_cache_gives_the_dynamic_cache_logits(padded):
    model = tiny_model()
    input_ids = random_tokens((2, 14))
    attention_mask = torch.ones_like(input_ids)
    if padded:
        attention_mask[0, :3] = 0
    steps = [6, 1, 1, 5, 1]
    dynamic = decode_in_steps(model, input_ids, steps, attention_mask=attention_mask)
    static_cache = MLRACache(model.config, max_cache_len=20)
    static = decode_in_steps(model, input_ids, steps, cache=static_cache, attention_mask=attention_mask)
    # Padding positions see only their own slot, so even their logits do not depend on the cache's capacity.
    torch.testing.assert_close(static, dynamic, atol=ATOL, rtol=0)
    assert static_cache.layers[0].buffer.shape[1] == 20
    assert int(static_cache.get_seq_length()) == 14


def test_a_transformers_dynamic_cache_is_refused_with_a_clear_type_error():
    model = tiny_model()
    with pytest.raises(TypeError, match="MLRACache"):
        model(random_tokens((1, 4)), **cache_kwargs(DynamicCache()))
    with pytest.raises(TypeError, match="MLRACache"):
        model.generate(random_tokens((1, 4)), max_new_tokens=2, **cache_kwargs(DynamicCache()))


# --- random sequences of cache operations -------------------------------------------------------------------------

MAX_BATCH = 9
OPERATION = st.one_of(
    st.tuples(st.just("prefill"), st.integers(2, 7)),
    st.tuples(st.just("decode"), st.just(1)),
    st.tuples(st.just("crop"), st.integers(0, 6)),
    st.tuples(st.just("reorder"), st.permutations(range(MAX_BATCH))),
    st.tuples(st.just("repeat"), st.integers(1, 3)),
    st.tuples(st.just("select"), st.lists(st.integers(0, MAX_BATCH - 1), min_size=1, max_size=3)),
)
PROPERTY_MODEL = tiny_model(absorbed_max_query_len=3, num_latent_blocks=4, num_softmax_branches=2)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=st.lists(OPERATION, min_size=1, max_size=8), static=st.booleans(), seed=st.integers(0, 2**16))
def test_any_sequence_of_cache_operations_matches_a_full_forward(operations, static, seed):
    """prefill k / decode 1 / crop n / reorder, repeat or select rows of the batch, in any order: every forward
    through the cache gives the logits of a full forward over the token sequences the cache now stands for."""
    model = PROPERTY_MODEL
    cache = MLRACache(model.config, max_cache_len=64 if static else None)
    tokens = torch.zeros(3, 0, dtype=torch.long)
    for step, (operation, argument) in enumerate(operations):
        if operation in ("prefill", "decode"):
            new = random_tokens((tokens.shape[0], argument), seed=seed + step)
            logits = model(new, **cache_kwargs(cache)).logits
            tokens = torch.cat([tokens, new], dim=1)
            torch.testing.assert_close(logits, full_forward(model, tokens)[:, -argument:], atol=ATOL, rtol=0)
        elif operation == "crop":
            removed = min(argument, tokens.shape[1])
            cache.crop(-removed)
            tokens = tokens[:, : tokens.shape[1] - removed]
        elif operation == "reorder":
            order = torch.tensor([row for row in argument if row < tokens.shape[0]])  # a permutation of the batch
            cache.reorder_cache(order)
            tokens = tokens[order]
        elif operation == "repeat" and tokens.shape[0] * argument <= MAX_BATCH:
            cache.batch_repeat_interleave(argument)
            tokens = tokens.repeat_interleave(argument, dim=0)
        elif operation == "select":
            rows = torch.tensor(argument) % tokens.shape[0]
            cache.batch_select_indices(rows)
            tokens = tokens[rows]
        assert int(cache.get_seq_length()) == tokens.shape[1]
