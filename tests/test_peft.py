"""LoRA through peft, the recipes of the README: an adapter acts alike in the expanded forward (training, prefill) and
in the absorbed decode on the compressed cache, and merging it gives the model it computed."""

import pytest
import torch
from conftest import FAMILY, cache_kwargs, random_tokens, tiny_model

from modeling_mlra import MLRACache

peft = pytest.importorskip("peft")

RECIPES = {
    # kv_b_proj through target_modules: one low-rank update shared by the latent blocks
    "attention": dict(target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]),
    "all_linear": dict(target_modules="all-linear"),
    # kv_b_proj's weight through target_parameters: one low-rank update per latent block
    "per_block": dict(target_modules=["q_b_proj"], target_parameters=["kv_b_proj.weight"]),
}


def with_adapter(recipe: str, model=None):
    """A tiny MLRA-2 with a LoRA adapter whose B is random (peft's default zero B would change nothing)."""
    model = model if model is not None else tiny_model(**FAMILY["mlra_2"])
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **RECIPES[recipe])
    return peft.get_peft_model(model, config).eval()


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_lora_changes_the_logits(recipe):
    input_ids = random_tokens((2, 10))
    with torch.no_grad():
        base = tiny_model(**FAMILY["mlra_2"])(input_ids, use_cache=False).logits
        adapted = with_adapter(recipe)(input_ids, use_cache=False).logits
    assert (adapted - base).abs().max() > 1e-2


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_merging_the_adapter_gives_the_logits_it_computed(recipe):
    model = with_adapter(recipe)
    input_ids = random_tokens((2, 10))
    with torch.no_grad():
        adapted = model(input_ids, use_cache=False).logits
        merged = model.merge_and_unload()(input_ids, use_cache=False).logits
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_decoding_through_the_cache_with_an_adapter_gives_the_full_forward_logits(recipe):
    model = with_adapter(recipe)
    input_ids = random_tokens((2, 10))
    cache = MLRACache(model.config)
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
        steps = [model(input_ids[:, :7], **cache_kwargs(cache)).logits]  # expanded prefill
        steps += [model(input_ids[:, i : i + 1], **cache_kwargs(cache)).logits for i in range(7, 10)]  # absorbed
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_training_an_adapter_on_kv_b_proj_reaches_only_the_adapter():
    model = with_adapter("attention")
    model.train()
    input_ids = random_tokens((2, 10))
    model(input_ids, labels=input_ids, use_cache=False).loss.backward()
    attention = model.base_model.model.model.layers[0].self_attn
    assert attention.kv_b_proj.lora_A["default"].weight.grad.abs().sum() > 0
    assert attention.kv_b_proj.lora_B["default"].weight.grad.abs().sum() > 0
    assert attention.kv_b_proj.base_layer.weight.grad is None
