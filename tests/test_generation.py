"""generate() on MLRA models: every decoding strategy transformers offers runs through the compressed cache and
gives what recomputing the whole prefix at every step gives."""

import pytest
import torch
from conftest import cache_kwargs, output_cache, random_tokens, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from torch._dynamo.utils import counters
from transformers import CompileConfig, PreTrainedTokenizerFast, TextStreamer

from modeling_mlra import MLRACache

PAD = 0


def prompt(shape, seed: int) -> torch.Tensor:
    """Random prompt tokens, never PAD: generate() would take a PAD inside a prompt for padding."""
    return random_tokens(shape, vocab_size=63, seed=seed) + 1


def greedy_without_cache(model, input_ids, new_tokens):
    """Greedy decoding by a full forward over the whole prefix at each step: what the cache must reproduce."""
    for _ in range(new_tokens):
        logits = model(input_ids, use_cache=False).logits[:, -1]
        input_ids = torch.cat([input_ids, logits.argmax(-1, keepdim=True)], dim=1)
    return input_ids


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.mark.parametrize("cache_implementation", [None, "static"], ids=["dynamic", "static"])
def test_left_padded_batch_gives_each_row_its_unpadded_result(model, cache_implementation):
    prompts = [prompt((length,), seed=length) for length in (9, 5, 7)]
    width = max(len(tokens) for tokens in prompts)
    input_ids = torch.full((len(prompts), width), PAD)
    attention_mask = torch.zeros_like(input_ids)
    for row, tokens in enumerate(prompts):
        input_ids[row, width - len(tokens) :] = tokens
        attention_mask[row, width - len(tokens) :] = 1

    batched = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD,
        cache_implementation=cache_implementation, return_dict_in_generate=True, output_logits=True,
    )
    batched_logits = torch.stack(batched.logits, dim=1)
    for row, tokens in enumerate(prompts):
        alone = model.generate(
            tokens[None], max_new_tokens=10, do_sample=False, pad_token_id=PAD,
            return_dict_in_generate=True, output_logits=True,
        )
        assert torch.equal(batched.sequences[row, width:], alone.sequences[0, len(tokens) :])
        torch.testing.assert_close(batched_logits[row], torch.stack(alone.logits, dim=1)[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("cache_implementation", [None, "static"], ids=["dynamic", "static"])
def test_beam_search_gives_the_same_beams_with_and_without_cache(model, cache_implementation):
    input_ids = prompt((2, 6), seed=1)
    kwargs = dict(max_new_tokens=8, num_beams=3, num_return_sequences=3, do_sample=False, pad_token_id=PAD)
    with_cache = model.generate(
        input_ids, **kwargs, cache_implementation=cache_implementation, output_scores=True,
        return_dict_in_generate=True,
    )
    without_cache = model.generate(
        input_ids, **kwargs, use_cache=False, output_scores=True, return_dict_in_generate=True
    )
    assert torch.equal(with_cache.sequences, without_cache.sequences)
    torch.testing.assert_close(with_cache.sequences_scores, without_cache.sequences_scores, atol=1e-4, rtol=0)


def test_sampling_with_a_fixed_seed_is_reproducible_through_the_cache(model):
    input_ids = prompt((2, 5), seed=2)
    kwargs = dict(max_new_tokens=12, do_sample=True, top_k=0, temperature=1.5, pad_token_id=PAD)
    samples = []
    for use_cache in (True, True, False):
        torch.manual_seed(1234)
        output = model.generate(input_ids, **kwargs, use_cache=use_cache, return_dict_in_generate=True)
        if use_cache:
            assert isinstance(output_cache(output), MLRACache)
            assert output_cache(output).get_seq_length() == output.sequences.shape[1] - 1
        samples.append(output.sequences)
    assert torch.equal(samples[0], samples[1])
    assert torch.equal(samples[0], samples[2])


def test_chunked_prefill_in_generate_gives_the_unchunked_output(model):
    # Chunks of 5 run the expanded path on top of the cache, the last chunk of 4 the absorbed one.
    input_ids = prompt((2, 14), seed=9)
    plain = model.generate(input_ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    chunked = model.generate(input_ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD, prefill_chunk_size=5)
    assert torch.equal(chunked, plain)


@pytest.mark.parametrize("max_cache_len", [None, 40], ids=["dynamic", "static"])
def test_a_second_turn_continues_from_the_returned_cache(model, max_cache_len):
    cache = MLRACache(model.config, max_cache_len=max_cache_len)
    greedy = dict(do_sample=False, pad_token_id=PAD, **cache_kwargs(cache))
    first = model.generate(prompt((1, 9), seed=1), max_new_tokens=5, **greedy)
    conversation = torch.cat([first, prompt((1, 7), seed=2)], dim=1)
    second = model.generate(conversation, max_new_tokens=6, **greedy)
    assert torch.equal(second, greedy_without_cache(model, conversation, 6))


def test_assisted_decoding_with_a_smaller_family_model_gives_plain_greedy_output(model):
    # Same vocabulary, one layer and a different family member: a cheap draft for the two-layer MLRA-4 model.
    assistant = tiny_model(seed=4, num_hidden_layers=1, num_latent_blocks=1, num_softmax_branches=1)
    for seed in range(3):
        input_ids = prompt((1, 6), seed=seed)
        plain = model.generate(input_ids, max_new_tokens=16, do_sample=False, pad_token_id=PAD)
        assisted = model.generate(
            input_ids, max_new_tokens=16, do_sample=False, pad_token_id=PAD, assistant_model=assistant
        )
        assert torch.equal(assisted, plain)
        assert torch.equal(plain, greedy_without_cache(model, input_ids, 16))


def test_assisted_decoding_with_the_model_itself_accepts_every_draft(model):
    """A draft that is always right makes generate() crop zero tokens after each step: the cache must stay whole."""
    input_ids = prompt((1, 6), seed=7)
    assisted = model.generate(input_ids, max_new_tokens=16, do_sample=False, pad_token_id=PAD, assistant_model=model)
    assert torch.equal(assisted, greedy_without_cache(model, input_ids, 16))


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with one word per model token, built offline."""
    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>")


def test_streaming_prints_the_generated_text(model, capsys):
    tokenizer = word_tokenizer(model.config.vocab_size)
    input_ids = tokenizer("w5 w17 w3 w40 w9", return_tensors="pt").input_ids
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    output = model.generate(input_ids, max_new_tokens=12, do_sample=False, pad_token_id=PAD, streamer=streamer)

    streamed = capsys.readouterr().out
    expected = tokenizer.decode(output[0, input_ids.shape[1] :])
    assert streamed.strip() == expected.strip()
    assert torch.equal(output, greedy_without_cache(model, input_ids, 12))


def test_static_cache_implementation_gives_the_dynamic_greedy_output(model):
    input_ids = prompt((2, 6), seed=5)
    dynamic = model.generate(input_ids, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    output = model.generate(
        input_ids, max_new_tokens=10, do_sample=False, pad_token_id=PAD, cache_implementation="static",
        return_dict_in_generate=True,
    )
    cache = output_cache(output)
    assert isinstance(cache, MLRACache) and cache.is_compileable
    assert cache.layers[0].buffer.shape[1] >= 15  # prompt + new tokens - 1 (the last token is never fed back)
    assert torch.equal(output.sequences, dynamic)


def test_static_generate_from_inputs_embeds_sizes_the_cache_for_the_embeddings_too():
    model = tiny_model(seed=5)
    embeds = model.get_input_embeddings()(prompt((2, 7), seed=5))
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True)
    static = model.generate(inputs_embeds=embeds, cache_implementation="static", **options)
    dynamic = model.generate(inputs_embeds=embeds, **options)
    assert output_cache(static).max_cache_len == 7 + 6 - 1
    assert torch.equal(static.sequences, dynamic.sequences)


def test_static_generate_calls_of_different_lengths_reuse_one_cache_of_the_largest_size():
    model = tiny_model(seed=5)
    options = dict(do_sample=False, pad_token_id=PAD, cache_implementation="static", return_dict_in_generate=True)
    caches = []
    for length, new_tokens in [(5, 8), (9, 2), (3, 4), (6, 12)]:
        input_ids = prompt((2, length), seed=length)
        output = model.generate(input_ids, max_new_tokens=new_tokens, **options)
        assert torch.equal(output.sequences, greedy_without_cache(model, input_ids, new_tokens))
        caches.append(output_cache(output))
    assert caches[0] is caches[1] is caches[2]  # 12, 10, 6 tokens fit in the first call's 12
    assert caches[3] is not caches[0] and caches[3].max_cache_len == 6 + 12 - 1
    assert output_cache(model.generate(prompt((3, 4), seed=1), max_new_tokens=2, **options)) is not caches[3]  # batch


def test_compiled_static_generate_never_recompiles_across_calls_of_different_lengths():
    model = tiny_model(seed=6, num_hidden_layers=1)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="eager", mode=None)
    compile_config._compile_all_devices = True  # generate() compiles on accelerators only unless told
    model.generation_config.compile_config = compile_config
    options = dict(do_sample=False, pad_token_id=PAD, cache_implementation="static")
    torch._dynamo.reset()
    counters.clear()
    model.generate(prompt((1, 5), seed=6), max_new_tokens=10, **options)
    assert counters["stats"]["unique_graphs"] == 1  # the decode step (the prefill runs eagerly)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for length, new_tokens in [(3, 4), (7, 2), (2, 9)]:
            input_ids = prompt((1, length), seed=length)
            output = model.generate(input_ids, max_new_tokens=new_tokens, **options)
            assert torch.equal(output, greedy_without_cache(model, input_ids, new_tokens))
    assert counters["stats"]["unique_graphs"] == 1


def test_static_cache_decoding_under_torch_compile_matches_eager():
    model = tiny_model(seed=6, num_hidden_layers=1)
    input_ids = prompt((1, 5), seed=6)
    eager = model.generate(input_ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False)
    compiled = model.generate(
        input_ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD, cache_implementation="static"
    )
    assert torch.equal(compiled, eager)


def test_compiled_beam_search_on_a_static_cache_compiles_once_and_never_per_step():
    model = tiny_model(seed=6, num_hidden_layers=1)
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False)
    options = dict(max_new_tokens=6, num_beams=2, do_sample=False, pad_token_id=PAD, cache_implementation="static")
    input_ids = prompt((1, 5), seed=6)
    first = model.generate(input_ids, **options)  # compiles the prefill and the decode step
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = model.generate(input_ids, **options)
    assert torch.equal(second, first)


def test_long_generation_past_the_initial_cache_capacity_matches_full_forward_greedy():
    model = tiny_model(seed=8, num_hidden_layers=1)
    input_ids = prompt((1, 4), seed=8)
    output = model.generate(
        input_ids, max_new_tokens=600, min_new_tokens=600, do_sample=False, pad_token_id=PAD,
        return_dict_in_generate=True,
    )
    assert output_cache(output).layers[0].buffer.shape[1] == 1024  # grew 256 -> 512 -> 1024
    assert torch.equal(output.sequences, greedy_without_cache(model, input_ids, 600))
