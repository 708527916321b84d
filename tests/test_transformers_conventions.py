"""What transformers expects of every architecture it ships: padding-free packed batches, the output flags, switching
the attention implementation at run time, RoPE settings from `rope_parameters`. Every model here has random (non-zero) output projections: with the
paper's zero-initialised o_proj and down_proj, a model's output ignores attention and these tests could not fail."""

import pytest
import torch
from conftest import FAMILY, random_tokens, tiny_config, tiny_model
from transformers import AttentionInterface

import modeling_mlra.modeling_mlra as modeling
from modeling_mlra import MLRACache, MLRAForCausalLM

SEQUENCE_LENGTHS = (5, 7, 3)  # packed into one row of 15 tokens


def packed_row(lengths=SEQUENCE_LENGTHS, seed=0):
    """(input_ids [1, sum], position_ids [1, sum] restarting at 0 for each sequence, the sequences)."""
    sequences = [random_tokens((1, length), seed=seed + i) for i, length in enumerate(lengths)]
    positions = torch.cat([torch.arange(length) for length in lengths])[None]
    return torch.cat(sequences, dim=1), positions, sequences


def logits_of_each_alone(model, sequences):
    return torch.cat([model(sequence, use_cache=False).logits for sequence in sequences], dim=1)


# --- packed (padding-free) batches ---------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [False, True], ids=["no_cache", "fresh_cache"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("member", list(FAMILY))
def test_packed_sequences_give_the_logits_of_each_sequence_alone(member, implementation, use_cache):
    model = tiny_model(**FAMILY[member])
    model.set_attn_implementation(implementation)
    input_ids, position_ids, sequences = packed_row()
    with torch.no_grad():
        packed = model(input_ids, position_ids=position_ids, use_cache=use_cache).logits
        alone = logits_of_each_alone(model, sequences)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("member", list(FAMILY))
def test_packed_sequences_give_the_gradients_of_each_sequence_alone(member, implementation):
    input_ids, position_ids, sequences = packed_row()
    weights = torch.randn(1, input_ids.shape[1], 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = {}
    for name in ("packed", "alone"):  # float64: the sums run in another order
        model = tiny_model(dtype=torch.float64, **FAMILY[member]).train()
        model.set_attn_implementation(implementation)
        if name == "packed":
            logits = model(input_ids, position_ids=position_ids, use_cache=False).logits
        else:
            logits = torch.cat([model(sequence, use_cache=False).logits for sequence in sequences], dim=1)
        (logits * weights).sum().backward()
        grads[name] = {parameter_name: p.grad for parameter_name, p in model.named_parameters()}
    for parameter_name, grad in grads["alone"].items():
        torch.testing.assert_close(grads["packed"][parameter_name], grad, msg=parameter_name)


def test_a_batch_of_packed_rows_gives_each_sequence_its_own_logits():
    model = tiny_model(**FAMILY["mlra_2"])
    first, first_positions, first_sequences = packed_row((5, 7, 3), seed=0)
    second, second_positions, second_sequences = packed_row((9, 6), seed=10)
    with torch.no_grad():
        packed = model(torch.cat([first, second]), position_ids=torch.cat([first_positions, second_positions])).logits
        torch.testing.assert_close(packed[:1], logits_of_each_alone(model, first_sequences), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[1:], logits_of_each_alone(model, second_sequences), atol=1e-5, rtol=1e-5)


def test_a_short_packed_row_on_a_fresh_cache_attends_within_each_sequence_in_absorbed_form():
    model = tiny_model(**FAMILY["mlra_4"])  # absorbed_max_query_len=4: a 4-token row runs the absorbed path
    input_ids, position_ids, sequences = packed_row((2, 2))
    with torch.no_grad():
        packed = model(input_ids, position_ids=position_ids).logits
        torch.testing.assert_close(packed, logits_of_each_alone(model, sequences), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention runs compiled on a GPU (on this CPU it crashes)")
def test_packed_sequences_under_flex_attention_give_the_logits_of_each_sequence_alone():
    model = tiny_model(**FAMILY["mlra_2"], qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16).cuda()
    model.set_attn_implementation("flex_attention")
    input_ids, position_ids, sequences = packed_row()
    with torch.no_grad():
        packed = model(input_ids.cuda(), position_ids=position_ids.cuda()).logits
        alone = logits_of_each_alone(model, [sequence.cuda() for sequence in sequences])
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)


# --- output flags ----------------------------------------------------------------------------------------------------


def test_eager_returns_every_layers_attention_probabilities_per_branch():
    model = tiny_model(**FAMILY["mlra_2"])
    model.set_attn_implementation("eager")
    config = model.config
    with torch.no_grad():
        attentions = model(random_tokens((2, 6)), output_attentions=True).attentions
    assert len(attentions) == config.num_hidden_layers
    for probs in attentions:  # [bsz, B, h, T, S]
        assert probs.shape == (2, config.num_softmax_branches, config.num_attention_heads, 6, 6)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
        assert (probs.triu(diagonal=1) == 0).all()  # causal


def test_decode_steps_return_the_attention_probabilities_of_a_full_forward():
    """The absorbed (cached) path returns the same per-branch maps as the expanded one."""
    model = tiny_model(**FAMILY["mlra_2"])
    model.set_attn_implementation("eager")
    input_ids = random_tokens((2, 9))
    with torch.no_grad():
        full = model(input_ids, use_cache=False, output_attentions=True).attentions
        prefill = model(input_ids[:, :8], use_cache=True)
        step = model(input_ids[:, 8:], cache=getattr(prefill, modeling.CACHE_FIELD), output_attentions=True).attentions
    for full_probs, step_probs in zip(full, step):
        torch.testing.assert_close(step_probs, full_probs[..., -1:, :], atol=1e-5, rtol=1e-5)


def test_sdpa_returns_no_attention_probabilities_as_transformers_models_do():
    model = tiny_model()
    with torch.no_grad():
        assert model(random_tokens((1, 6)), output_attentions=True).attentions == ()


@pytest.mark.parametrize("where", ["argument", "config"])
def test_return_dict_false_gives_a_tuple_with_the_loss_first(where):
    model = tiny_model()
    input_ids = random_tokens((2, 6))
    if where == "config":
        model.config.return_dict = False
    options = {"return_dict": False} if where == "argument" else {}
    with torch.no_grad():
        loss, logits = model(input_ids, labels=input_ids, **options)[:2]
        expected = model(input_ids, labels=input_ids, return_dict=True)
    torch.testing.assert_close(loss, expected.loss)
    torch.testing.assert_close(logits, expected.logits)


@pytest.mark.parametrize("flag", ["output_hidden_states", "output_attentions"])
def test_config_output_flags_are_the_defaults(flag):
    model = tiny_model()
    model.set_attn_implementation("eager")
    setattr(model.config, flag, True)
    with torch.no_grad():
        output = model(random_tokens((1, 5)))
    field = {"output_hidden_states": "hidden_states", "output_attentions": "attentions"}[flag]
    expected = model.config.num_hidden_layers + (flag == "output_hidden_states")
    assert len(getattr(output, field)) == expected


def test_hidden_states_are_the_embeddings_each_layers_output_and_the_normed_last():
    model = tiny_model()
    input_ids = random_tokens((1, 5))
    with torch.no_grad():
        output = model.model(input_ids, output_hidden_states=True)
        layer_output = model.model.layers[0](output.hidden_states[0], model.model.rotary_emb(output.hidden_states[0], torch.arange(5)[None]))
    torch.testing.assert_close(output.hidden_states[0], model.model.embed_tokens(input_ids))
    torch.testing.assert_close(output.hidden_states[1], layer_output)
    torch.testing.assert_close(output.hidden_states[-1], output.last_hidden_state)


def test_generate_returns_the_attention_probabilities_of_every_step_with_eager():
    model = tiny_model(seed=3)
    model.set_attn_implementation("eager")
    input_ids = random_tokens((1, 6), vocab_size=63) + 1
    with torch.no_grad():
        out = model.generate(
            input_ids, max_new_tokens=3, do_sample=False, output_attentions=True, return_dict_in_generate=True,
            pad_token_id=0,
        )
    assert len(out.attentions) == 3
    branches, heads = model.config.num_softmax_branches, model.config.num_attention_heads
    assert out.attentions[0][0].shape == (1, branches, heads, 6, 6)
    assert out.attentions[2][0].shape == (1, branches, heads, 1, 8)


def test_static_generate_with_attentions_where_the_kernel_would_run_gives_the_pytorch_path_tokens_and_maps():
    """With the fused kernel on (CUDA's default; Triton's interpreter here) a static-cache step gets the kernel's
    padding-only mask; a step that returns attention maps runs in PyTorch instead and must still apply the causal
    rule and the padding (left-padded rows)."""
    model = tiny_model(seed=3)
    model.set_attn_implementation("eager")
    input_ids = random_tokens((2, 7), vocab_size=63) + 1
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    outputs = {}
    for kernel in ("torch", "triton"):
        model.config.decode_kernel = kernel
        with torch.no_grad():
            outputs[kernel] = model.generate(
                input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                cache_implementation="static", output_attentions=True, return_dict_in_generate=True,
            )
    assert torch.equal(outputs["triton"].sequences, outputs["torch"].sequences)
    torch.testing.assert_close(outputs["triton"].attentions[-1][0], outputs["torch"].attentions[-1][0])


def test_assisted_decoding_returns_the_attention_probabilities_with_eager():
    model = tiny_model(seed=3)
    assistant = tiny_model(seed=4, num_hidden_layers=1)
    for each in (model, assistant):
        each.set_attn_implementation("eager")
    input_ids = random_tokens((1, 6), vocab_size=63) + 1
    with torch.no_grad():
        out = model.generate(
            input_ids, max_new_tokens=4, do_sample=False, output_attentions=True, return_dict_in_generate=True,
            assistant_model=assistant, pad_token_id=0,
        )
        plain = model.generate(input_ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out.sequences, plain)
    assert len(out.attentions) == 4
    assert out.attentions[-1][0].shape[-2:] == (1, 9)


# --- the attention implementation, switched at run time ------------------------------------------------------------


@pytest.fixture
def ran(monkeypatch):
    """The names of the attention implementations that run, in order: sdpa, eager and a registered "recording"."""
    names = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    eager = modeling.eager_attention_forward

    def recording_sdpa(*args, **kwargs):
        names.append("sdpa")
        return sdpa(*args, **kwargs)

    def recording_eager(*args, **kwargs):
        names.append("eager")
        return eager(*args, **kwargs)

    def recording(*args, **kwargs):
        names.append("recording")
        return eager(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    monkeypatch.setattr(modeling, "eager_attention_forward", recording_eager)
    AttentionInterface.register("recording", recording)
    return names


@pytest.mark.parametrize(
    "start, switch_to", [("sdpa", "eager"), ("eager", "sdpa"), ("sdpa", "recording"), ("recording", "eager")]
)
def test_set_attn_implementation_switches_the_attention_at_run_time(start, switch_to, ran):
    model = tiny_model(**FAMILY["mlra_2"], num_hidden_layers=1)
    input_ids = random_tokens((1, 6))
    with torch.no_grad():
        model.set_attn_implementation(start)
        before = model(input_ids, use_cache=False).logits
        model.set_attn_implementation(switch_to)
        ran.clear()
        after = model(input_ids, use_cache=False).logits
    assert model.config._attn_implementation == switch_to
    assert ran == [switch_to] * model.config.num_softmax_branches  # one call per softmax branch
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_set_attn_implementation_reaches_flex_attention():
    """FlexAttention runs only on a GPU here (test_modeling compares it there); the switch itself works anywhere."""
    model = tiny_model()
    model.set_attn_implementation("flex_attention")
    assert model.config._attn_implementation == "flex_attention"


# --- RoPE: config.rope_parameters is the one source ------------------------------------------------------------------


def cos_sin(model, positions):
    """The model's cos/sin tables [1, T, d_r] for `positions`."""
    hidden = torch.zeros(1, len(positions), model.config.hidden_size)
    return model.model.rotary_emb(hidden, torch.tensor(positions)[None])


def test_a_rope_theta_argument_lands_in_rope_parameters():
    assert tiny_config(rope_theta=500.0).rope_parameters == {"rope_type": "default", "rope_theta": 500.0}


def test_rope_parameters_replaced_after_the_config_is_built_are_what_the_model_uses():
    config = tiny_config()
    config.rope_parameters = {"rope_type": "default", "rope_theta": 500.0}
    model = MLRAForCausalLM(config)
    d_r = config.qk_rope_head_dim
    expected = 1.0 / 500.0 ** (torch.arange(0, d_r, 2).float() / d_r)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected)


def test_linear_scaling_divides_the_positions_by_its_factor():
    plain = tiny_model()
    linear = tiny_model(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
    for ours, expected in zip(cos_sin(linear, [0, 4, 8, 12]), cos_sin(plain, [0, 1, 2, 3])):
        torch.testing.assert_close(ours, expected)


def test_dynamic_scaling_raises_the_base_only_past_max_position_embeddings():
    """NTK-aware dynamic scaling: base * (factor * T / max_position_embeddings - (factor - 1)) ** (d / (d - 2)) for
    a sequence of T tokens longer than max_position_embeddings (16 here); the plain frequencies within it."""
    rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    dynamic = tiny_model(max_position_embeddings=16, rope_parameters=rope)
    plain = tiny_model(max_position_embeddings=16)
    within = list(range(16))
    for ours, expected in zip(cos_sin(dynamic, within), cos_sin(plain, within)):
        torch.testing.assert_close(ours, expected)

    d_r, length = dynamic.config.qk_rope_head_dim, 24
    base = 10000.0 * (2.0 * length / 16 - 1.0) ** (d_r / (d_r - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, d_r, 2).float() / d_r)
    angles = torch.arange(length)[:, None].float() * inv_freq
    cos, sin = cos_sin(dynamic, list(range(length)))
    torch.testing.assert_close(cos[0], torch.cat([angles, angles], -1).cos())
    torch.testing.assert_close(sin[0], torch.cat([angles, angles], -1).sin())


def test_an_unsupported_rope_type_set_after_the_config_is_built_is_refused_when_the_model_is_built():
    config = tiny_config()
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    with pytest.raises(ValueError, match="rope_type 'llama3' is not supported"):
        MLRAForCausalLM(config)


# --- the cache argument ------------------------------------------------------------------------------------------------


def test_generate_fills_a_cache_passed_as_cache_without_a_deprecation_warning(recwarn):
    """`generate(..., cache=cache)`, the README's form: transformers' name on newer 5.x releases, taken by the model on
    earlier ones, where `past_key_values=` is the name (it warns on newer ones)."""
    model = tiny_model(seed=3)
    input_ids = random_tokens((1, 6), vocab_size=63) + 1
    cache = MLRACache(model.config)
    with torch.no_grad():
        continued = model.generate(input_ids, max_new_tokens=4, do_sample=False, pad_token_id=0, cache=cache)
        plain = model.generate(input_ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(continued, plain)
    assert cache.get_seq_length() == 6 + 3  # the last new token is never fed back
    assert not [warning for warning in recwarn if issubclass(warning.category, FutureWarning)]



def test_generate_builds_no_second_cache_beside_one_passed_as_cache(monkeypatch):
    """On releases that call generate()'s cache `past_key_values`, a cache passed as `cache=` is the one generate()
    fills and returns; no other cache is built beside it."""
    model = tiny_model(seed=3)
    input_ids = random_tokens((1, 6), vocab_size=63) + 1
    cache = MLRACache(model.config)
    built = []
    original_init = MLRACache.__init__
    monkeypatch.setattr(MLRACache, "__init__", lambda self, *a, **k: (built.append(self), original_init(self, *a, **k)))
    with torch.no_grad():
        out = model.generate(
            input_ids, max_new_tokens=4, do_sample=False, pad_token_id=0, cache=cache, return_dict_in_generate=True
        )
    assert out.get("cache", out.get("past_key_values")) is cache
    assert built == []
