"""The model family as specified in docs/design.md sections 2-3: config rules, the attention equations, masks and
training."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from conftest import FAMILY, random_tokens, tiny_config, tiny_model

from modeling_mlra import VARIANTS, MLRAConfig, MLRAForCausalLM
from modeling_mlra.modeling_mlra import eager_attention_forward

TINY_DIMENSIONS = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def design_attention(attn, x, positions):
    """docs/design.md section 3 written out literally: one loop over heads and branches, no shared index helpers."""
    c = attn.config
    h, d_n, d_r, d_v = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    L, B = c.num_latent_blocks, c.num_softmax_branches
    G, d_l = L // B, c.kv_lora_rank // L
    T = x.shape[0]
    if c.q_lora_rank:
        cq = rms_norm(x @ attn.q_a_proj.weight.T, attn.q_a_layernorm.weight, c.rms_norm_eps) * c.q_latent_scale
        q = (cq @ attn.q_b_proj.weight.T).view(T, h, d_n + d_r)
    else:
        q = (x @ attn.q_proj.weight.T).view(T, h, d_n + d_r)
    ckr = x @ attn.kv_a_proj_with_mqa.weight.T
    c_all, kr = ckr[:, : c.kv_lora_rank], ckr[:, c.kv_lora_rank :]
    norm_weight = attn.kv_a_layernorm.weight
    if c.latent_norm == "shared":
        c_all = rms_norm(c_all, norm_weight, c.rms_norm_eps)
        blocks = [c_all[:, l * d_l : (l + 1) * d_l] for l in range(L)]
    else:
        blocks = [
            rms_norm(c_all[:, l * d_l : (l + 1) * d_l], norm_weight[l * d_l : (l + 1) * d_l], c.rms_norm_eps)
            for l in range(L)
        ]
    blocks = [block * c.kv_latent_scale for block in blocks]

    inv_freq = 1.0 / (c.rope_parameters["rope_theta"] ** (torch.arange(0, d_r, 2).float() / d_r))
    angles = positions[:, None].float() * inv_freq

    def rope(v):  # v [T, d_r]
        if c.rope_interleave:
            pairs = v.view(T, d_r // 2, 2)
            a, b = pairs[..., 0], pairs[..., 1]
        else:
            a, b = v[:, : d_r // 2], v[:, d_r // 2 :]
        return torch.cat([a * angles.cos() - b * angles.sin(), a * angles.sin() + b * angles.cos()], -1)

    kr = rope(kr)
    tau = 1 / math.sqrt(d_n + d_r)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    heads_per_group = h // G
    out = torch.zeros(T, h, d_v)
    for i in range(h):
        g = i // heads_per_group
        q_nope, q_rope = q[:, i, :d_n], rope(q[:, i, d_n:])
        for b in range(B):
            l = b * G + g
            w = attn.kv_b_proj.weight[l].view(heads_per_group, d_n + d_v, d_l)[i % heads_per_group]
            k_nope, v = blocks[l] @ w[:d_n].T, blocks[l] @ w[d_n:].T
            score = (q_nope @ k_nope.T + q_rope @ kr.T) * tau
            p = score.masked_fill(~causal, float("-inf")).softmax(-1)
            out[:, i] += c.attn_output_scale * (p @ v)
    o = out.reshape(T, h * d_v)
    if c.attention_output_gate:
        o = o * torch.sigmoid(x @ attn.o_gate_proj.weight.T)
    return o @ attn.o_proj.weight.T


@pytest.mark.parametrize("variant", ["mla", "gla_2", "gla_4", "mlra_2", "mlra_4"])
def test_presets_have_published_structure(variant):
    config = MLRAConfig.from_variant(variant)
    expected = {"mla": (1, 1), "gla_2": (2, 1), "gla_4": (4, 1), "mlra_2": (4, 2), "mlra_4": (4, 4)}[variant]
    assert (config.num_latent_blocks, config.num_softmax_branches) == expected
    assert (config.hidden_size, config.num_hidden_layers, config.kv_lora_rank) == (3072, 24, 512)
    assert config.q_lora_rank == (1536 if variant == "mla" else 1024)


def test_mlra_4_variance_scales_are_the_papers():
    config = MLRAConfig.from_variant("mlra_4")
    assert config.q_latent_scale == pytest.approx(math.sqrt(3))
    assert config.kv_latent_scale == pytest.approx(math.sqrt(24))
    assert config.attn_output_scale == pytest.approx(0.5)


def test_no_scale_presets_turn_all_three_scales_off():
    config = MLRAConfig.from_variant("mlra_2_no_scale")
    assert (config.q_latent_scale, config.kv_latent_scale, config.attn_output_scale) == (1.0, 1.0, 1.0)


def test_every_variant_name_builds():
    for variant in VARIANTS:
        assert MLRAConfig.from_variant(variant, **TINY_DIMENSIONS).variant == variant


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"kv_lora_rank": 14, "num_latent_blocks": 4}, "kv_lora_rank"),
        ({"num_latent_blocks": 4, "num_softmax_branches": 3}, "num_latent_blocks"),
        ({"num_latent_blocks": 4, "num_softmax_branches": 1, "num_attention_heads": 6}, "num_attention_heads"),
        ({"latent_norm": "per_head"}, "latent_norm"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ],
)
def test_impossible_combination_raises_naming_the_field(fields, named):
    with pytest.raises(ValueError, match=named):
        tiny_config(**fields)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown variant 'mlra_8'"):
        MLRAConfig.from_variant("mlra_8")


def test_each_latent_block_serves_exactly_one_branch_and_group():
    config = tiny_config(**FAMILY["mlra_2"])
    blocks = [config.latent_block(b, g) for b in range(2) for g in range(config.num_head_groups)]
    assert sorted(blocks) == list(range(config.num_latent_blocks))


@pytest.mark.parametrize("member", ["mla", "gla_2", "gla_4", "mlra_2", "mlra_4"])
def test_attention_reads_latent_blocks_in_the_configs_order(member):
    config = tiny_config(**FAMILY[member])
    attn = MLRAForCausalLM(config).model.layers[0].self_attn
    grid = attn.by_branch_and_group(torch.arange(config.num_latent_blocks), 0)
    for b in range(config.num_softmax_branches):
        for g in range(config.num_head_groups):
            assert grid[b, g] == config.latent_block(b, g)


def test_config_round_trips_through_auto_config(tmp_path):
    config = MLRAConfig.from_variant("gla_2_gated", **TINY_DIMENSIONS)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MLRAConfig)
    fields = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert fields(loaded) == fields(config)


@pytest.mark.parametrize("member", list(FAMILY))
def test_attention_matches_design_equations(member):
    model = tiny_model(**FAMILY[member])
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 10, model.config.hidden_size)
    positions = torch.arange(10)
    with torch.no_grad():
        cos_sin = model.model.rotary_emb(x, positions[None])
        ours, _ = attn(x, cos_sin, attention_mask=None)
        expected = design_attention(attn, x[0], positions)
    torch.testing.assert_close(ours[0], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("member", ["mla", "gla_2", "gla_4", "mlra_2", "mlra_4_gated"])
def test_eager_and_sdpa_agree(member):
    model = tiny_model(**FAMILY[member])
    ids = random_tokens((2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        sdpa = model(ids, attention_mask=mask).logits
        model.config._attn_implementation = "eager"
        eager = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(eager[0], sdpa[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eager[1, 3:], sdpa[1, 3:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("member", ["mla", "gla_2", "mlra_2", "mlra_4"])
def test_sdpa_training_gradients_equal_the_eager_ones(member):
    ids = random_tokens((2, 12))
    grads = {}
    for implementation in ("sdpa", "eager"):
        model = tiny_model(**FAMILY[member]).train()
        model.config._attn_implementation = implementation
        model(ids, labels=ids).loss.backward()
        grads[implementation] = {name: p.grad for name, p in model.named_parameters() if "self_attn" in name}
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads["sdpa"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention runs compiled on a GPU (on this CPU it crashes)")
@pytest.mark.parametrize("member", ["mla", "mlra_2"])
def test_flex_attention_gives_the_eager_logits(member):
    model = tiny_model(**FAMILY[member], qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16).cuda()
    ids = random_tokens((2, 16)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    logits = {}
    with torch.no_grad():
        for implementation in ("flex_attention", "eager"):
            model.config._attn_implementation = implementation
            logits[implementation] = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits["flex_attention"][real], logits["eager"][real], atol=1e-4, rtol=1e-4)


def test_an_attention_function_registered_with_transformers_runs_the_expanded_path():
    """Any implementation in transformers' AttentionInterface (flex_attention, kernels from the Hub, ...) gets the
    causal rule and padding as a 4D additive mask and gives eager's result."""
    calls = []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append(attention_mask.shape)
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("recording_eager", recording_attention)
    model = tiny_model(**FAMILY["mlra_2"])
    ids = random_tokens((2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    logits = {}
    with torch.no_grad():
        for implementation in ("recording_eager", "eager"):
            model.config._attn_implementation = implementation
            logits[implementation] = (model(ids, use_cache=False).logits, model(ids, attention_mask=mask).logits)
    assert calls == [(1, 1, 7, 7)] * 2 * model.config.num_hidden_layers + [(2, 1, 7, 7)] * 2 * 2
    torch.testing.assert_close(logits["recording_eager"][0], logits["eager"][0])
    torch.testing.assert_close(logits["recording_eager"][1][mask.bool()], logits["eager"][1][mask.bool()])


def test_left_padded_row_equals_unpadded_forward():
    model = tiny_model(**FAMILY["mlra_2"])
    ids = random_tokens((1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(ids, use_cache=False).logits
        in_batch = model(padded, attention_mask=mask, use_cache=False).logits[:, 4:]
    torch.testing.assert_close(in_batch, alone, atol=1e-4, rtol=1e-4)


def test_fully_padded_positions_stay_finite():
    model = tiny_model()
    ids = random_tokens((1, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        assert torch.isfinite(model(ids, attention_mask=mask).logits).all()


def test_labels_give_shifted_cross_entropy():
    model = tiny_model(**FAMILY["gla_4"])
    ids = random_tokens((2, 10))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_tokens((2, 10))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:  # renamed activation_checkpointing_enable in later 5.x releases
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.kv_b_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_initialisation_follows_the_paper():
    torch.manual_seed(0)
    model = MLRAForCausalLM(tiny_config(hidden_size=256))
    layer = model.model.layers[0]
    assert layer.self_attn.o_proj.weight.abs().sum() == 0
    assert layer.mlp.down_proj.weight.abs().sum() == 0
    assert layer.self_attn.kv_b_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert layer.mlp.gate_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(layer.self_attn.kv_a_layernorm.weight, torch.ones(model.config.kv_lora_rank))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_device_map_auto_places_decoder_layers_whole(tmp_path):
    model = tiny_model(**FAMILY["mlra_2"])
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto")
    ids = random_tokens((1, 7))
    with torch.no_grad():  # on a GPU machine "auto" places the layers there
        torch.testing.assert_close(loaded(ids.to(loaded.device)).logits.cpu(), model(ids).logits)


def test_attention_mask_of_wrong_rank_raises():
    model = tiny_model(**FAMILY["mla"])
    ids = random_tokens((1, 5))
    with pytest.raises(ValueError, match="attention_mask must be 2D"):
        model(ids, attention_mask=torch.ones(1, 5, 5))


@pytest.mark.parametrize("token_id", [64, 1000, -1])
def test_a_token_id_outside_the_vocabulary_is_refused_naming_it_and_the_limit(token_id):
    model = tiny_model()
    input_ids = random_tokens((2, 5))
    input_ids[1, 3] = token_id
    with pytest.raises(ValueError, match=rf"token id {token_id}, outside the model's vocabulary \[0, 64\).*tokenizer"):
        model(input_ids)


def test_a_token_id_outside_the_vocabulary_is_refused_by_a_device_assert_when_compiling(monkeypatch):
    """Under torch.compile (and on accelerators) the check is an asynchronous device assert, without a host sync."""
    model = tiny_model()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match=r"token id outside \[0, 64\)"):
        model(torch.tensor([[1, 2, 64]]), use_cache=False)
