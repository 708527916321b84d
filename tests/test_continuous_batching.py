"""Continuous batching (transformers' `generate_batch` and `ContinuousBatchingManager`) on pages that hold the latent:
each request's tokens equal generate()'s for that request alone."""

import pytest
import torch
from conftest import FAMILY, tiny_model
from transformers import GenerationConfig
from transformers.generation.continuous_batching import ContinuousBatchingManager, RequestStatus

import modeling_mlra.modeling_mlra
from modeling_mlra import MLRACache
from modeling_mlra.mlra_decode_kernel import LatentPages, mlra_decode_attention
from modeling_mlra.modeling_mlra import MLRAAttention
from modeling_mlra.paged_cache import MLRAPagedLatent, paged_cache_bytes_per_token

try:  # the batch and page sizes are named differently across 5.x: `page_size` (>= 5.2x) or `block_size`
    from transformers import ContinuousBatchingConfig
except ImportError:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

# very different lengths: a 2-token prompt, a short one, and one longer than the batch's token budget below (its
# prefill runs in chunks, some short enough for the absorbed path, the others expanded)
PROMPTS = [[5, 9], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [(7 * i + 3) % 64 for i in range(70)]]


def greedy_config(max_new_tokens: int = 12) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)


def small_batches(**fields) -> ContinuousBatchingConfig:
    """Room for a few requests at once and at most 32 tokens per step, so long prompts prefill in chunks."""
    return ContinuousBatchingConfig(max_batch_tokens=32, num_blocks=64, **fields)


def generate_alone(model, prompt: list[int], generation_config: GenerationConfig) -> list[int]:
    input_ids = torch.tensor([prompt])  # an explicit mask: generate() would take pad_token_id tokens for padding
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=generation_config)
    return output[0, len(prompt) :].tolist()


def finished_results(manager: ContinuousBatchingManager, request_ids) -> dict:
    """The final output of each request, in whatever order they finish (the manager's queue is shared)."""
    results = {}
    while len(results) < len(request_ids):
        output = manager.get_result(timeout=60)
        assert output is not None, f"no result within a minute; finished: {sorted(results)}"
        if output.request_id in request_ids and output.is_finished():
            results[output.request_id] = output
    return results


@pytest.mark.parametrize("member", sorted(FAMILY))
def test_generate_batch_equals_generate_for_each_request(member):
    model = tiny_model(seed=3, **FAMILY[member])
    config = greedy_config()
    results = model.generate_batch(PROMPTS, generation_config=config, continuous_batching_config=small_batches())
    assert len(results) == len(PROMPTS)
    for result, prompt in zip(results.values(), PROMPTS):
        assert result.error is None
        assert result.generated_tokens == generate_alone(model, prompt, config), (member, prompt)


def test_sampling_with_top_k_one_is_greedy_and_sampling_stays_in_the_vocabulary():
    model = tiny_model(seed=4)
    top_1 = GenerationConfig(max_new_tokens=12, do_sample=True, top_k=1, eos_token_id=-1, pad_token_id=0)
    top_1 = model.generate_batch(PROMPTS, generation_config=top_1, continuous_batching_config=small_batches())
    for result, prompt in zip(top_1.values(), PROMPTS):
        assert result.generated_tokens == generate_alone(model, prompt, greedy_config())
    torch.manual_seed(0)
    sampled = model.generate_batch(
        PROMPTS, generation_config=GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.5,
                                                    eos_token_id=-1, pad_token_id=0),
        continuous_batching_config=small_batches(),
    )
    for result in sampled.values():
        assert result.error is None and len(result.generated_tokens) == 12
        assert all(0 <= token < model.config.vocab_size for token in result.generated_tokens)


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter is on only where there is no GPU (conftest)")
@pytest.mark.parametrize("member", ["mla", "mlra_2"])
def test_decode_kernel_runs_one_row_per_sequence_of_the_packed_batch(member, monkeypatch):
    """decode_kernel="triton" (Triton's interpreter on the CPU): sequences with few new tokens run as rows of the fused
    kernel, each reading only its own cached rows, in place in the pages (nothing gathered), also in steps where a
    long prompt prefills a chunk beside them (expanded, on its own, on its gathered rows); the tokens equal the
    PyTorch path's, for each request alone."""
    launches = []

    def counted(q_absorbed, q_rope, kv_cache, *args, row_starts=None, **kwargs):
        launches.append((tuple(q_absorbed.shape[:2]), row_starts is not None, isinstance(kv_cache, LatentPages)))
        return mlra_decode_attention(q_absorbed, q_rope, kv_cache, *args, row_starts=row_starts, **kwargs)

    monkeypatch.setattr(modeling_mlra.modeling_mlra, "mlra_decode_attention", counted)
    model = tiny_model(seed=7, decode_kernel="triton", **FAMILY[member])
    config = greedy_config(max_new_tokens=6)
    prompts = [[5, 9], [3, 1, 4, 1], PROMPTS[2]]  # 2 and 4 new tokens (absorbed_max_query_len 4), then a 70-token one
    results = model.generate_batch(prompts, generation_config=config, continuous_batching_config=small_batches())
    assert ((2, 2), True, False) in launches  # the first step: nothing cached, the new rows read as they are
    assert ((3, 4), True, True) in launches  # rows of 4 beside the long prompt's first chunk, on the pages
    assert ((3, 1), True, True) in launches  # decode steps of all three, on the pages
    model.config.decode_kernel = "torch"
    for result, prompt in zip(results.values(), prompts):
        assert result.generated_tokens == generate_alone(model, prompt, config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter is on only where there is no GPU (conftest)")
def test_where_pages_cannot_be_read_in_place_the_kernel_reads_gathered_rows_and_says_why(monkeypatch):
    warnings, launches = [], []

    def counted(q_absorbed, q_rope, kv_cache, *args, **kwargs):
        launches.append(isinstance(kv_cache, LatentPages))
        return mlra_decode_attention(q_absorbed, q_rope, kv_cache, *args, **kwargs)

    monkeypatch.setattr(modeling_mlra.modeling_mlra, "mlra_decode_attention", counted)
    monkeypatch.setattr(modeling_mlra.paged_cache.logger, "warning_once", warnings.append)
    monkeypatch.setattr(MLRAPagedLatent, "latent_pages", lambda self, *args: self.gathered("a layout of the test"))
    model = tiny_model(seed=7, decode_kernel="triton", **FAMILY["mlra_2"])
    config = greedy_config(max_new_tokens=4)
    results = model.generate_batch(PROMPTS[:2], generation_config=config, continuous_batching_config=small_batches())
    assert launches and not any(launches)
    assert warnings and all("not the pages: a layout of the test" in warning for warning in warnings)
    model.config.decode_kernel = "torch"
    for result, prompt in zip(results.values(), PROMPTS[:2]):
        assert result.generated_tokens == generate_alone(model, prompt, config)


class _SlidingWindowCache:
    """Just enough of a paged cache whose layer 0 has a sliding window, in both releases' layouts."""

    def __init__(self, allocators: bool):
        if allocators:  # transformers >= 5.2x
            self.layer_to_allocator = {0: type("SlidingAttentionAllocator", (), {"layer_type": "sliding_attention"})()}
        else:
            self.layer_index_to_group_indices, self.sliding_windows = {0: (0, 0)}, {0: 8}

    def update(self, key_states, value_states, layer_idx, kwargs):
        raise AssertionError("not called")


@pytest.mark.parametrize("allocators", [True, False])
def test_a_sliding_window_layer_is_not_read_in_place(allocators, monkeypatch):
    warnings = []
    monkeypatch.setattr(modeling_mlra.paged_cache.logger, "warning_once", warnings.append)
    paged = MLRAPagedLatent(_SlidingWindowCache(allocators), {"read_index": [torch.arange(4)]})
    assert paged.latent_pages(0, 10) is None
    assert len(warnings) == 1 and "layer 0" in warnings[0]


def test_requests_streamed_while_others_run_equal_generate():
    model = tiny_model(seed=5, num_latent_blocks=4, num_softmax_branches=2)
    config = greedy_config(max_new_tokens=30)
    manager: ContinuousBatchingManager = model.init_continuous_batching(
        generation_config=config, continuous_batching_config=small_batches()
    )
    manager.start()
    try:
        first = manager.add_request(PROMPTS[1], max_new_tokens=30, streaming=True)
        streamed = []
        later = {}
        for output in manager.request_id_iter(first):
            streamed.append(list(output.generated_tokens))
            if len(output.generated_tokens) == 3:  # the first request is decoding: add the others now
                later = {manager.add_request(prompt, max_new_tokens=8): prompt for prompt in (PROMPTS[2], PROMPTS[0])}
            if output.status == RequestStatus.FINISHED:
                break
        results = finished_results(manager, later)
    finally:
        manager.stop(block=True, timeout=30)
    assert len(streamed) > 2 and streamed[-1] == generate_alone(model, PROMPTS[1], config)
    assert all(len(earlier) <= len(after) for earlier, after in zip(streamed, streamed[1:]))
    for request_id, prompt in later.items():
        assert results[request_id].generated_tokens == generate_alone(model, prompt, greedy_config(max_new_tokens=8))


def test_prompts_sharing_a_prefix_share_its_pages_and_keep_their_tokens():
    model = tiny_model(seed=8)
    config = greedy_config(max_new_tokens=6)
    prefix = [(5 * i + 1) % 64 for i in range(32)]  # four whole pages of 8 tokens
    prompts = [prefix + [3, 9], prefix + [7], prefix + [11, 12, 13]]
    page = "page_size" if "page_size" in ContinuousBatchingConfig.__dataclass_fields__ else "block_size"
    manager = model.init_continuous_batching(
        generation_config=config, continuous_batching_config=small_batches(allow_block_sharing=True, **{page: 8})
    )
    manager.start()
    try:
        first = finished_results(manager, [manager.add_request(prompts[0], max_new_tokens=6)])
        cache, matched = manager.batch_processor.cache, []
        search = cache.search_prefix_match
        cache.search_prefix_match = lambda *args: matched.append(search(*args)) or matched[-1]
        later = finished_results(manager, [manager.add_request(prompt, max_new_tokens=6) for prompt in prompts[1:]])
    finally:
        manager.stop(block=True, timeout=30)
    assert matched == [32, 32]  # the later requests read the first one's pages of the prefix
    for result, prompt in zip([*first.values(), *later.values()], prompts):
        assert result.generated_tokens == generate_alone(model, prompt, config)


def test_pages_hold_the_latent_row_of_mlra_cache():
    model = tiny_model(seed=6)
    manager = model.init_continuous_batching(generation_config=greedy_config(), continuous_batching_config=small_batches())
    manager.start()
    try:
        finished_results(manager, [manager.add_request(PROMPTS[1], max_new_tokens=2)])
        paged = manager.batch_processor.cache
    finally:
        manager.stop(block=True, timeout=30)
    cache = MLRACache(model.config)
    model(torch.tensor([PROMPTS[1]]), **{"past_key_values": cache})
    config = model.config
    assert cache.bytes_per_token == config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 4
    assert paged_cache_bytes_per_token(paged) == cache.bytes_per_token


def test_no_attention_reads_the_rows_of_another_request(monkeypatch):
    """Each request attends over its own rows only (memory linear in the batch's tokens): no call of the attention
    sees more rows than the longest request holds, where attending over the packed batch builds scores of every query
    against every key of every request (on an H200, 94.5 GiB at 256 requests x 1K)."""
    rows_seen = []
    for path in ("absorbed_softmax", "expanded_attention"):
        original = getattr(MLRAAttention, path)

        def recorded(self, q_nope, q_rope, kv_states, *args, original=original, **kwargs):
            rows_seen.append(kv_states.shape[1])
            return original(self, q_nope, q_rope, kv_states, *args, **kwargs)

        monkeypatch.setattr(MLRAAttention, path, recorded)
    model = tiny_model(seed=10)
    config = greedy_config()
    results = model.generate_batch(PROMPTS, generation_config=config, continuous_batching_config=small_batches())
    assert all(result.error is None for result in results.values())
    assert max(rows_seen) <= max(len(prompt) for prompt in PROMPTS) + config.max_new_tokens


def test_tokens_do_not_depend_on_the_mask_continuous_batching_passes(monkeypatch):
    """For sdpa and eager, continuous batching passes a block-diagonal mask [1, 1, T, pages + T]; CUDA's memory-
    efficient sdpa kernel misreads its rows past 2^32 elements (uint32 row offsets: on an H200, with millions of
    pages, the 700- and 1800-token prompts of benchmarks/gpu_check.py got wrong tokens). The attention finds each
    request's rows from the cumulative lengths instead: a mask that allows every key changes no token."""
    model = tiny_model(seed=9)
    config = greedy_config()
    alone = [generate_alone(model, prompt, config) for prompt in PROMPTS]
    forward = model.forward

    def with_a_wrong_mask(*args, attention_mask=None, **kwargs):
        if isinstance(attention_mask, dict):
            attention_mask = {name: torch.zeros_like(mask) for name, mask in attention_mask.items()}
        elif attention_mask is not None:
            attention_mask = torch.zeros_like(attention_mask)
        return forward(*args, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(model, "forward", with_a_wrong_mask)
    results = model.generate_batch(PROMPTS, generation_config=config, continuous_batching_config=small_batches())
    assert [result.generated_tokens for result in results.values()] == alone
