"""generate() reading its stop decision one step late (MLRAForCausalLM._sample, transformers' DeferredStopCheck), so
that the host queues the next decode step while the GPU runs this one: the same tokens and streamer output as
transformers' plain loop, taken exactly where nothing of the extra step can leave generate().

The deferred path runs on CUDA; here it runs on the CPU through `deferring_on_cpu`: the CPU is added to the devices
that defer, and `torch.Event` (the CPU has no events) becomes a stand-in whose record and wait do nothing, which is
exact there because a copy to the host has finished when it returns."""

import pytest
import torch
from conftest import random_tokens, tiny_model
from transformers.generation.streamers import BaseStreamer

from modeling_mlra import MLRACache
from modeling_mlra import modeling_mlra as mlra

PAD = 0


class HostEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=5)


@pytest.fixture
def deferred_checks(monkeypatch):
    """Counts the deferred stop checks generate() builds (whatever the device)."""
    built = []
    init = mlra.AlwaysDeferredStopCheck.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(mlra.AlwaysDeferredStopCheck, "__init__", counting_init)
    return built


@pytest.fixture
def deferring_on_cpu(monkeypatch, deferred_checks):
    monkeypatch.setattr(mlra, "DEFERRED_STOP_CHECK_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(torch, "Event", HostEvent)
    return deferred_checks


def prompt(shape, seed: int) -> torch.Tensor:
    return random_tokens(shape, vocab_size=63, seed=seed) + 1


def static_generate(model, input_ids, **options):
    options = dict(dict(max_new_tokens=12, do_sample=False, pad_token_id=PAD, cache_implementation="static"), **options)
    options.setdefault("attention_mask", torch.ones_like(input_ids))
    return model.generate(input_ids, **options)


def plain_and_deferred(model, monkeypatch, deferred_checks, generate):
    """`generate()` through transformers' plain loop, then through the deferred one (which must be taken)."""
    plain = generate()
    assert not deferred_checks, "the CPU defers only when deferring_on_cpu adds it"
    monkeypatch.setattr(mlra, "DEFERRED_STOP_CHECK_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(torch, "Event", HostEvent)
    deferred = generate()
    assert len(deferred_checks) == 1, "the static-cache generate() did not take the deferred stop check"
    return plain, deferred


def test_static_generate_takes_the_deferred_stop_check_on_the_devices_that_defer(model, deferring_on_cpu):
    static_generate(model, prompt((1, 6), seed=1))
    assert len(deferring_on_cpu) == 1


def test_greedy_tokens_are_those_of_the_plain_loop(model, monkeypatch, deferred_checks):
    input_ids = prompt((1, 6), seed=2)
    plain, deferred = plain_and_deferred(
        model, monkeypatch, deferred_checks, lambda: static_generate(model, input_ids)
    )
    assert torch.equal(plain, deferred)


def test_sampling_with_a_seed_gives_the_tokens_of_the_plain_loop(model, monkeypatch, deferred_checks):
    input_ids = prompt((2, 5), seed=3)

    def sample():
        torch.manual_seed(11)
        return static_generate(model, input_ids, do_sample=True, top_k=20, temperature=1.5)

    plain, deferred = plain_and_deferred(model, monkeypatch, deferred_checks, sample)
    assert torch.equal(plain, deferred)


def test_an_eos_stop_drops_the_extra_step(model, monkeypatch, deferred_checks):
    """Stopped by eos before max_length, the deferred loop has run one step more: its token must not show."""
    input_ids = prompt((1, 6), seed=4)
    reference = static_generate(model, input_ids, max_new_tokens=20)
    eos = int(reference[0, 6 + 8])  # the 9th new token: the first time it appears, generation stops there
    stop_at = 6 + int((reference[0, 6:] == eos).nonzero()[0]) + 1
    plain, deferred = plain_and_deferred(
        model, monkeypatch, deferred_checks,
        lambda: static_generate(model, input_ids, max_new_tokens=20, eos_token_id=eos),
    )  # fmt: skip
    assert plain.shape[1] == stop_at < reference.shape[1]
    assert torch.equal(plain, deferred)


def test_a_batch_whose_rows_stop_at_different_steps_gives_the_plain_loop_output(model, monkeypatch, deferred_checks):
    """Left padding, and rows that reach eos at different steps (padding after it), all before max_length."""
    prompts = [prompt((length,), seed=length) for length in (7, 4, 6)]
    input_ids = torch.full((3, 7), PAD)
    attention_mask = torch.zeros_like(input_ids)
    for row, tokens in enumerate(prompts):
        input_ids[row, 7 - len(tokens) :] = tokens
        attention_mask[row, 7 - len(tokens) :] = 1
    reference = static_generate(model, input_ids, attention_mask=attention_mask, max_new_tokens=16)
    eos = [int(reference[row, 7 + step]) for row, step in enumerate((2, 9, 5))]  # each row stops by that step
    plain, deferred = plain_and_deferred(
        model, monkeypatch, deferred_checks,
        lambda: static_generate(model, input_ids, attention_mask=attention_mask, max_new_tokens=16, eos_token_id=eos),
    )  # fmt: skip
    assert plain.shape[1] < reference.shape[1] and (plain[:, 7:] == PAD).any(), "the eos case is not exercised"
    assert torch.equal(plain, deferred)


def test_a_streamer_receives_the_tokens_of_the_plain_loop(model, monkeypatch, deferred_checks):
    input_ids = prompt((1, 6), seed=6)
    reference = static_generate(model, input_ids, max_new_tokens=20)
    eos = int(reference[0, 6 + 5])
    streamers = []

    def streamed():
        streamers.append(RecordingStreamer())
        return static_generate(model, input_ids, max_new_tokens=20, eos_token_id=eos, streamer=streamers[-1])

    plain, deferred = plain_and_deferred(model, monkeypatch, deferred_checks, streamed)
    assert torch.equal(plain, deferred)
    assert streamers[0].puts == streamers[1].puts and streamers[1].ended
    assert len(streamers[1].puts) == 1 + plain.shape[1] - 6  # the prompt, then each new token once


@pytest.mark.parametrize(
    "options",
    [
        dict(return_dict_in_generate=True),
        dict(cache_implementation=None),
        dict(cache_implementation=None, past_key_values="user"),
    ],
    ids=["dict_returned_with_the_cache", "growing_cache", "users_own_cache"],
)
def test_the_plain_loop_runs_where_the_extra_step_could_leave_generate(model, deferring_on_cpu, options):
    """A returned dict hands back the cache (with the extra step's row); a cache passed in is the user's."""
    options = dict(options)
    if options.pop("past_key_values", None) == "user":
        options[mlra.CACHE_FIELD] = MLRACache(model.config, max_cache_len=32)
    static_generate(model, prompt((1, 6), seed=7), **options)
    assert not deferring_on_cpu


def test_the_cpu_runs_the_plain_loop(model, deferred_checks):
    static_generate(model, prompt((1, 6), seed=8))
    assert not deferred_checks
