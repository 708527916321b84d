"""Shared helpers for the cache and generation tests: the authors' reference fixtures and tiny random models."""

import functools
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

if not torch.cuda.is_available():
    # Without a GPU (CI) the Triton kernels run in Triton's interpreter; it must be on before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests import the package from the working tree, without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_mlra import MLRACache, MLRAConfig, MLRAForCausalLM  # noqa: E402
from modeling_mlra.modeling_mlra import CACHE_FIELD  # noqa: E402

# The models here are tiny: one thread is fastest, and on a shared CPU the default thread pool spins against the
# other processes' threads (measured: a 1-layer decode step 0.3 ms with one thread, 12 ms with two under load).
torch.set_num_threads(1)

REFERENCE_DIR = Path(__file__).parent / "fixtures" / "reference"
REFERENCE_VARIANTS = sorted(
    path.name for path in REFERENCE_DIR.iterdir() if (path / "pytorch_model.bin").exists()
)

# One tiny config per structural case of the family; the latent block width (16 / L) differs from the head
# dims and d_v != d_n on purpose, so a mixed-up axis fails loudly instead of broadcasting.
FAMILY = {
    "mla": dict(num_latent_blocks=1, num_softmax_branches=1),
    "gla_2": dict(num_latent_blocks=2, num_softmax_branches=1),
    "gla_4": dict(num_latent_blocks=4, num_softmax_branches=1),
    "mlra_2": dict(num_latent_blocks=4, num_softmax_branches=2),
    "mlra_4": dict(num_latent_blocks=4, num_softmax_branches=4),
    "mlra_4_shared_norm": dict(num_latent_blocks=4, num_softmax_branches=4, latent_norm="shared"),
    "mlra_2_no_q_lora": dict(num_latent_blocks=4, num_softmax_branches=2, q_lora_rank=None),
    "gla_2_interleaved_rope": dict(num_latent_blocks=2, num_softmax_branches=1, rope_interleave=True),
    "mlra_4_gated": dict(num_latent_blocks=4, num_softmax_branches=4, attention_output_gate=True),
    "mlra_2_no_scale": dict(
        num_latent_blocks=4, num_softmax_branches=2, q_latent_scale=1.0, kv_latent_scale=1.0, attn_output_scale=1.0
    ),
}


def cache_kwargs(cache) -> dict:
    """The cache as the keyword the installed transformers calls it (`cache` or `past_key_values`)."""
    return {CACHE_FIELD: cache}


def output_cache(output):
    return getattr(output, CACHE_FIELD)


def tiny_config(**overrides) -> MLRAConfig:
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        num_latent_blocks=4,
        num_softmax_branches=4,
        max_position_embeddings=2048,
        absorbed_max_query_len=4,
    )
    fields.update(overrides)
    return MLRAConfig(**fields)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> MLRAForCausalLM:
    """A tiny model with every weight random: the default init zeroes the output projections, which would make
    attention invisible in the logits and every attention test pass trivially."""
    model = MLRAForCausalLM(tiny_config(**overrides))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return model.to(dtype).eval()


@functools.cache
def reference(variant: str) -> tuple[MLRAForCausalLM, dict[str, torch.Tensor]]:
    """The authors' checkpoint for `variant` loaded in our model, and what their code computed on it."""
    folder = REFERENCE_DIR / variant
    return MLRAForCausalLM.from_pretrained(folder).eval(), load_file(folder / "expected.safetensors")


def random_tokens(shape, vocab_size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _no_grad(request):
    """Inference-only modules (cache, generation) run without autograd; training tests keep it."""
    if request.module.__name__.rsplit(".", 1)[-1] not in ("test_cache", "test_generation"):
        yield
        return
    with torch.no_grad():
        yield


__all__ = ["MLRACache", "cache_kwargs", "output_cache", "reference", "tiny_config", "tiny_model", "random_tokens"]
