"""The Triton GEMV of the decode step's projections against plain products and against the model's plain path.

Without a GPU the kernel runs in Triton's interpreter (conftest), with float16/float32 operands; on a GPU the same
tests run compiled, bfloat16 included.
"""

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import FAMILY, MLRACache, cache_kwargs, random_tokens, tiny_model
from modeling_mlra import decode_gemv
from modeling_mlra.decode_gemv import SIDE_BY_SIDE, SINGLE, SWIGLU, gemv_linears, mlra_gemv, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def draw(*shape, dtype, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator)).to(dtype).to(DEVICE)


def relative_error(out, reference):
    out, reference = out.double().cpu(), reference.double().cpu()
    return ((out - reference).norm() / reference.norm()).item()


class Launch(NamedTuple):
    mode: int
    norm: bool  # an RMSNorm applied to the input inside the launch
    residual: bool  # a residual added to the output inside the launch


@pytest.fixture
def launches(monkeypatch):
    """The GEMV launches (a test of the fast path must fail if the path is not taken)."""
    calls = []
    original = decode_gemv._gemv

    def counted(x, w, w2, mode, norm_weight=None, eps=0.0, scale=1.0, residual=None, **choices):
        calls.append(Launch(mode, norm_weight is not None, residual is not None))
        return original(x, w, w2, mode, norm_weight, eps, scale, residual, **choices)

    monkeypatch.setattr(decode_gemv, "_gemv", counted)
    return calls


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def normed_product(mode, x, norm_weight, w, w2, eps=1e-5):
    """In float64: x through RMSNorm, then the product a launch of `mode` makes with w (and w2)."""
    normed = rms_norm(x.double(), norm_weight.double(), eps)
    if mode == SWIGLU:
        return F.silu(normed @ w.double().T) * (normed @ w2.double().T)
    if mode == SIDE_BY_SIDE:
        return torch.cat([normed @ w.double().T, normed @ w2.double().T], dim=-1)
    return normed @ w.double().T


# (rows, outputs, reduction): one and several rows; outputs and reduction off the tile sizes (masked tails), a
# reduction of exactly one tile (loaded in straight-line code), a small one-row launch's 1024-wide tiles, or down_proj's
# (a reduction of 8K values or more)
SHAPES = [
    (1, 40, 72), (3, 24, 600), (16, 64, 256), (1, 96, 1100), (9, 40, 1100), (1, 24, 64), (6, 40, 128), (1, 40, 3000),
    (1, 6, 8200),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, outputs, reduction", SHAPES)
def test_gemv_matches_the_matrix_product(dtype, rows, outputs, reduction):
    x = draw(rows, reduction, dtype=dtype, seed=1)
    w = draw(outputs, reduction, dtype=dtype, seed=2)
    out = mlra_gemv(x[None, None], w[None, None])[0]
    assert relative_error(out, x.double() @ w.double().T) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, outputs, reduction", SHAPES[:3])
def test_two_weights_side_by_side_give_both_products(dtype, rows, outputs, reduction):
    x = draw(rows, reduction, dtype=dtype, seed=3)
    w, w2 = draw(outputs, reduction, dtype=dtype, seed=4), draw(outputs + 24, reduction, dtype=dtype, seed=5)
    out = mlra_gemv(x[None, None], w[None, None], w2[None, None], SIDE_BY_SIDE)[0]
    expected = torch.cat([x.double() @ w.double().T, x.double() @ w2.double().T], dim=-1)
    assert out.shape == expected.shape and relative_error(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, outputs, reduction", SHAPES[:3])
def test_swiglu_gives_silu_of_the_gate_times_the_up_projection(dtype, rows, outputs, reduction):
    x = draw(rows, reduction, dtype=dtype, seed=6)
    gate, up = draw(outputs, reduction, dtype=dtype, seed=7), draw(outputs, reduction, dtype=dtype, seed=8)
    out = mlra_gemv(x[None, None], gate[None, None], up[None, None], SWIGLU)[0]
    expected = F.silu(x.double() @ gate.double().T) * (x.double() @ up.double().T)
    assert relative_error(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [SINGLE, SIDE_BY_SIDE, SWIGLU])
@pytest.mark.parametrize("rows, outputs, reduction", SHAPES)
def test_the_norm_before_and_the_scale_and_residual_after_are_those_of_the_plain_ops(
    dtype, mode, rows, outputs, reduction
):
    x = draw(rows, reduction, dtype=dtype, seed=30, scale=3.0)
    norm_weight = draw(reduction, dtype=dtype, seed=31, scale=0.1) + 1
    w = draw(outputs, reduction, dtype=dtype, seed=32, scale=0.2)
    w2 = draw(outputs, reduction, dtype=dtype, seed=33, scale=0.2)
    product = normed_product(mode, x, norm_weight, w, w2)
    residual = draw(*product.shape, dtype=dtype, seed=34)
    out = mlra_gemv(
        x[None, None], w[None, None], w2[None, None] if mode != SINGLE else None, mode, norm_weight, 1e-5, 0.7,
        residual[None],
    )[0]
    assert relative_error(out, residual.double() + 0.7 * product) < TOLERANCE[dtype]


def test_a_norm_weight_or_residual_of_another_shape_is_refused():
    x, w = draw(1, 1, 2, 32, dtype=torch.float32, seed=35), draw(1, 1, 8, 32, dtype=torch.float32, seed=36)
    with pytest.raises(ValueError, match="norm_weight"):
        mlra_gemv(x, w, norm_weight=draw(16, dtype=torch.float32, seed=37))
    with pytest.raises(ValueError, match="residual"):
        mlra_gemv(x, w, residual=draw(1, 2, 4, dtype=torch.float32, seed=38))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5])
def test_batched_views_give_the_absorbed_up_projections(dtype, rows):
    """The W_UK fold ([B * h] products of a head's rows, weights read transposed) and W_UV (branches summed as
    segments), on views of one up-projection weight as the model takes them."""
    branches, heads, nope, value, block = 2, 3, 8, 6, 16
    weight = draw(branches, heads, nope + value, block, dtype=dtype, seed=9)
    w_uk, w_uv = weight.split([nope, value], dim=2)
    q_nope = draw(heads, rows, nope, dtype=dtype, seed=10)
    folded = mlra_gemv(q_nope[:, None], w_uk.transpose(-1, -2).flatten(0, 1)[:, None])
    expected = torch.matmul(q_nope.double(), w_uk.double()).flatten(0, 1)
    assert relative_error(folded, expected) < TOLERANCE[dtype]
    mixed = draw(branches, heads, rows, block, dtype=dtype, seed=11)
    output = mlra_gemv(mixed.transpose(0, 1), w_uv.transpose(0, 1))
    expected = torch.matmul(mixed.double(), w_uv.double().transpose(-1, -2)).sum(dim=0)
    assert relative_error(output, expected) < TOLERANCE[dtype]


@pytest.mark.skipif(
    DEVICE != "cuda" or not decode_gemv.programmatic_launch(0), reason="programmatic dependent launch needs Hopper"
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [SINGLE, SIDE_BY_SIDE, SWIGLU])
@pytest.mark.parametrize("rows, outputs, reduction", [shape for shape in SHAPES if shape[0] == 1])
def test_a_launch_that_loads_its_first_weight_tile_before_waiting_gives_the_same_output(
    dtype, mode, rows, outputs, reduction
):
    """`preload`: the first weight tile read before the kernel before is waited for (a reduction shorter than,
    equal to and longer than one tile), with the norm, scale and residual inside, as the plain launch gives."""
    x = draw(rows, reduction, dtype=dtype, seed=35, scale=3.0)
    norm_weight = draw(reduction, dtype=dtype, seed=36, scale=0.1) + 1
    w = draw(outputs, reduction, dtype=dtype, seed=37, scale=0.2)
    w2 = draw(outputs, reduction, dtype=dtype, seed=38, scale=0.2) if mode != SINGLE else None
    residual = draw(rows, outputs * (2 if mode == SIDE_BY_SIDE else 1), dtype=dtype, seed=39)

    def launch(preload):
        return decode_gemv._gemv(
            x[None, None], w[None, None], w2[None, None] if w2 is not None else None, mode, norm_weight, 1e-5, 0.7,
            residual[None], pdl=True, preload=preload,
        )[0]

    assert relative_error(launch(True), launch(False).double()) < TOLERANCE[dtype]


# one-row launches: without PDL (any device), and on Hopper as a programmatic launch that loads its first tile early
LAUNCHES = [dict(pdl=False)] + (
    [dict(pdl=True, preload=True)] if DEVICE == "cuda" and decode_gemv.programmatic_launch(0) else []
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [SINGLE, SIDE_BY_SIDE, SWIGLU])
@pytest.mark.parametrize("rows, outputs, reduction", [shape for shape in SHAPES if shape[0] == 1])
@pytest.mark.parametrize("launch", LAUNCHES, ids=str)
def test_a_launch_that_loads_the_next_weight_tile_ahead_gives_the_plain_products(
    dtype, mode, rows, outputs, reduction, launch
):
    """`lookahead`: each whole step of the loop asks for the next step's weight tile before it multiplies its own
    (reductions shorter than one tile, of one tile, and of several whole tiles and a remainder), with the norm,
    scale and residual inside."""
    x = draw(rows, reduction, dtype=dtype, seed=51, scale=3.0)
    norm_weight = draw(reduction, dtype=dtype, seed=52, scale=0.1) + 1
    w = draw(outputs, reduction, dtype=dtype, seed=53, scale=0.2)
    w2 = draw(outputs, reduction, dtype=dtype, seed=54, scale=0.2)
    product = normed_product(mode, x, norm_weight, w, w2)
    residual = draw(*product.shape, dtype=dtype, seed=55)
    out = decode_gemv._gemv(
        x[None, None], w[None, None], w2[None, None] if mode != SINGLE else None, mode, norm_weight, 1e-5, 0.7,
        residual[None], lookahead=True, **launch,
    )[0]
    assert relative_error(out, residual.double() + 0.7 * product) < TOLERANCE[dtype]


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
@pytest.mark.parametrize("preload", [False, True])
def test_chained_launches_replayed_in_a_cuda_graph_read_each_others_outputs(preload, monkeypatch):
    """Each launch reads the output of the one before it, which a programmatic dependent launch (the default on
    Hopper) may start before that one has finished, loading its first weight tile before it waits (`preload`) or
    not: replayed on new inputs, the chain gives the plain products."""
    config = decode_gemv.gemv_config
    monkeypatch.setattr(decode_gemv, "gemv_config", lambda *shape, **choices: config(*shape, preload=preload, **choices))
    weights = [draw(256, 256, dtype=torch.float32, seed=41 + i, scale=256**-0.5) for i in range(6)]
    norm_weight = draw(256, dtype=torch.float32, seed=47, scale=0.1) + 1
    x = draw(1, 256, dtype=torch.float32, seed=48)

    def chain(x):  # alternately a norm before and a residual after, as the model's launches
        for i, weight in enumerate(weights):
            if i % 2 == 0:
                x = mlra_gemv(x[None, None], weight[None, None], norm_weight=norm_weight, eps=1e-6)[0]
            else:
                x = mlra_gemv(x[None, None], weight[None, None], residual=x[None])[0]
        return x

    def plain_chain(x):
        x = x.double()
        for i, weight in enumerate(weights):
            if i % 2 == 0:
                x = rms_norm(x, norm_weight.double(), 1e-6) @ weight.double().T
            else:
                x = x + x @ weight.double().T
        return x

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(x)
    for seed in (49, 50):
        x.copy_(draw(1, 256, dtype=torch.float32, seed=seed))
        graph.replay()
        assert relative_error(out, plain_chain(x)) < 1e-5


def test_more_than_sixteen_rows_are_refused_by_the_kernel_and_left_to_the_modules():
    x = draw(17, 32, dtype=torch.float32, seed=12)
    linear = nn.Linear(32, 8, bias=False, device=DEVICE)
    with pytest.raises(ValueError, match="at most 16 rows"):
        mlra_gemv(x[None, None], linear.weight[None, None])
    with torch.no_grad():
        assert gemv_linears(x, linear) is None


def test_one_weight_and_several_rows_are_left_to_cublas_two_weights_are_not():
    x = draw(4, 32, dtype=torch.float32, seed=29)
    gate, up = (nn.Linear(32, 8, bias=False, device=DEVICE) for _ in range(2))
    with torch.no_grad():
        assert gemv_linears(x, gate) is None
        assert gemv_linears(x[:1], gate) is not None
        torch.testing.assert_close(gemv_linears(x, gate, up, swiglu=True), F.silu(gate(x)) * up(x))


def test_modules_the_kernel_cannot_read_as_they_are_are_left_to_their_forward():
    x = draw(1, 32, dtype=torch.float32, seed=13)
    with torch.no_grad():
        plain = nn.Linear(32, 8, bias=False, device=DEVICE)
        assert gemv_linears(x, plain) is not None
        assert gemv_linears(x, nn.Linear(32, 8, device=DEVICE)) is None  # a bias
        hooked = nn.Linear(32, 8, bias=False, device=DEVICE)
        hooked.register_forward_hook(lambda *args: None)
        assert gemv_linears(x, hooked) is None

        class Subclass(nn.Linear):  # e.g. a tensor-parallel row shard, whose forward all-reduces
            pass

        assert gemv_linears(x, Subclass(32, 8, bias=False, device=DEVICE)) is None
        assert gemv_linears(x.double(), plain) is None  # another dtype
    assert gemv_linears(x, plain) is None  # the weight needs its gradient


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("member", FAMILY)
def test_decode_steps_through_the_gemv_match_the_plain_path(member, batch, launches):
    fast = tiny_model(seed=20, **FAMILY[member], decode_kernel="triton").to(DEVICE)
    plain = tiny_model(seed=20, **FAMILY[member], decode_kernel="torch").to(DEVICE)
    ids = random_tokens((batch, 7), seed=21).to(DEVICE)
    fast_cache, plain_cache = MLRACache(fast.config), MLRACache(plain.config)
    with torch.no_grad():
        fast(ids[:, :6], **cache_kwargs(fast_cache))
        plain(ids[:, :6], **cache_kwargs(plain_cache))
        launches.clear()
        step = fast(ids[:, 6:], **cache_kwargs(fast_cache)).logits
        expected = plain(ids[:, 6:], **cache_kwargs(plain_cache)).logits
    # per layer: q (+ kv_a) side by side, SwiGLU, W_UK and W_UV; one row also q_b (with a q latent), o_proj and
    # down_proj, and the lm_head once
    layers, has_q_b = fast.config.num_hidden_layers, fast.config.q_lora_rank is not None
    modes = [launch.mode for launch in launches]
    assert modes.count(SWIGLU) == modes.count(SIDE_BY_SIDE) == layers
    assert modes.count(SINGLE) == (layers * (4 + has_q_b) + 1 if batch == 1 else 2 * layers)
    # one row: the norms in the launches that read them (the input norm unless the output gate reads it too), the
    # residuals in o_proj's and down_proj's
    ungated = not fast.config.attention_output_gate
    norms = layers * (1 + ungated + has_q_b) if batch == 1 else 0
    assert sum(launch.norm for launch in launches) == norms
    assert sum(launch.residual for launch in launches) == (2 * layers if batch == 1 else 0)
    assert relative_error(step, expected) < 1e-5


def test_a_norm_with_a_hook_is_called_and_the_step_still_matches_the_plain_path(launches):
    fast = tiny_model(seed=39, decode_kernel="triton").to(DEVICE)
    plain = tiny_model(seed=39, decode_kernel="torch").to(DEVICE)
    seen = []
    fast.model.layers[0].input_layernorm.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    ids = random_tokens((1, 5), seed=40).to(DEVICE)
    fast_cache, plain_cache = MLRACache(fast.config), MLRACache(plain.config)
    with torch.no_grad():
        fast(ids[:, :4], **cache_kwargs(fast_cache))
        plain(ids[:, :4], **cache_kwargs(plain_cache))
        seen.clear(), launches.clear()
        step = fast(ids[:, 4:], **cache_kwargs(fast_cache)).logits
        expected = plain(ids[:, 4:], **cache_kwargs(plain_cache)).logits
    assert seen == [(1, 1, fast.config.hidden_size)]
    assert launches[0] == Launch(SIDE_BY_SIDE, norm=False, residual=False)  # layer 0's q_a + kv_a: the norm was called
    assert relative_error(step, expected) < 1e-5


@pytest.mark.skipif(DEVICE != "cuda", reason="bfloat16 through the compiled kernel")
def test_a_bfloat16_decode_step_through_the_gemv_matches_the_plain_path():
    fast = tiny_model(seed=22, dtype=torch.bfloat16, decode_kernel="triton").to(DEVICE)
    plain = tiny_model(seed=22, dtype=torch.bfloat16, decode_kernel="auto").to(DEVICE)  # eager CUDA: cuBLAS
    ids = random_tokens((16, 5), seed=23).to(DEVICE)
    fast_cache, plain_cache = MLRACache(fast.config), MLRACache(plain.config)
    with torch.no_grad():
        fast(ids[:, :4], **cache_kwargs(fast_cache))
        plain(ids[:, :4], **cache_kwargs(plain_cache))
        step = fast(ids[:, 4:], **cache_kwargs(fast_cache)).logits
        expected = plain(ids[:, 4:], **cache_kwargs(plain_cache)).logits
    assert relative_error(step, expected) < 2e-2


def test_prefill_of_more_than_sixteen_rows_and_training_call_the_modules(launches):
    model = tiny_model(seed=24, decode_kernel="triton").to(DEVICE)
    ids = random_tokens((3, 8), seed=25).to(DEVICE)
    with torch.no_grad():
        model(ids)  # 24 rows
    assert launches == []
    loss = model(ids[:1], labels=ids[:1]).loss  # 8 rows, with gradients
    loss.backward()
    assert launches == [] and model.model.layers[0].mlp.gate_proj.weight.grad is not None


def test_the_gemv_is_captured_by_torch_compile_without_graph_breaks():
    linear_a = nn.Linear(32, 16, bias=False, device=DEVICE).requires_grad_(False)
    linear_b = nn.Linear(32, 16, bias=False, device=DEVICE).requires_grad_(False)
    x = draw(1, 2, 32, dtype=torch.float32, seed=26)

    def mlp(x):
        return gemv_linears(x, linear_a, linear_b, swiglu=True) * 2

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(mlp)(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(mlp, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), F.silu(linear_a(x)) * linear_b(x) * 2)


def test_auto_leaves_eager_steps_to_cublas_and_takes_the_gemv_inside_torch_compile(launches):
    model = tiny_model(seed=27, decode_kernel="auto").to(DEVICE)
    ids = random_tokens((1, 1), seed=28).to(DEVICE)
    with torch.no_grad():
        model(ids)
        assert launches == []
        torch._dynamo.reset()
        torch.compile(model, fullgraph=True, backend="eager")(ids)
    assert (len(launches) > 0) == (DEVICE == "cuda")
