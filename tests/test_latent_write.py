"""The one-launch write of a decode step's new latent rows into the static cache (`modeling_mlra/latent_write.py`)
against the PyTorch ops it replaces. Without a GPU the kernel runs in Triton's interpreter (conftest), float16 and
float32; on a GPU compiled, bfloat16 included.
"""

import pytest
import torch

from conftest import FAMILY, MLRACache, cache_kwargs, random_tokens, tiny_model
from modeling_mlra import latent_write
from modeling_mlra.latent_write import triton_available, write_latent_rows
from modeling_mlra.modeling_mlra import MLRARMSNorm, apply_rotary_pos_emb

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.fixture
def writes(monkeypatch):
    """The launches of the latent write, by new tokens (a test of the fast path must fail if it is not taken)."""
    calls = []
    original = latent_write._write_latent_rows

    def counted(buffer, start, projected, *args):
        calls.append(projected.shape[1])
        return original(buffer, start, projected, *args)

    monkeypatch.setattr(latent_write, "_write_latent_rows", counted)
    return calls


def draw(*shape, dtype, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator)).to(dtype).to(DEVICE)


# (latent width, norm groups, rope width, interleaved rope): the published 4 x 128 + 64, one group, widths that are
# not powers of two (masked tiles)
SHAPES = [(512, 4, 64, False), (16, 1, 8, True), (24, 2, 6, False), (48, 4, 12, True)]


def query_rope_view(bsz, new_tokens, heads, rope_dim, dtype, seed, nope_dim=5):
    """The query's rope heads [bsz, T, h, d_r] as the model hands them over: a view of the query projection's output
    [bsz, T, h, d_n + d_r] (strides of its own)."""
    return draw(bsz, new_tokens, heads, nope_dim + rope_dim, dtype=dtype, seed=seed, scale=3.0)[..., nope_dim:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("latent_dim, groups, rope_dim, interleave", SHAPES)
def test_written_rows_are_the_normed_scaled_latent_and_the_rotated_rope_key_at_their_slots(
    dtype, latent_dim, groups, rope_dim, interleave
):
    bsz, new_tokens, capacity, start = 3, 2, 9, 5
    norm = MLRARMSNorm(latent_dim, eps=1e-6, num_groups=groups).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + draw(latent_dim, dtype=dtype, seed=1, scale=0.3))
    projected = draw(bsz, new_tokens, latent_dim + rope_dim, dtype=dtype, seed=2, scale=3.0)
    cos = draw(bsz, new_tokens, rope_dim, dtype=dtype, seed=3)
    sin = draw(bsz, new_tokens, rope_dim, dtype=dtype, seed=4)
    buffer = torch.zeros(bsz + 1, capacity, latent_dim + rope_dim, dtype=dtype, device=DEVICE)  # a spare row
    write_latent_rows(
        buffer, torch.tensor(start, device=DEVICE), projected, norm.weight, 1e-6, groups, 1.7, cos, sin, interleave,
        query_rope_view(bsz, new_tokens, 3, rope_dim, dtype, seed=5),
    )
    with torch.no_grad():
        latent = norm(projected[..., :latent_dim]) * 1.7
        rope_key = apply_rotary_pos_emb(projected[..., latent_dim:].unsqueeze(2), cos, sin, interleave).squeeze(2)
        exact_rope_key = apply_rotary_pos_emb(
            projected[..., latent_dim:].double().unsqueeze(2), cos.double(), sin.double(), interleave
        ).squeeze(2)
    written_rows = buffer[:bsz, start : start + new_tokens]
    # the latent: the PyTorch ops' roundings (16-bit dtypes bit for bit; float32 up to the order of the norm's sum)
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(written_rows[..., :latent_dim], latent, **tolerance)
    # the rope key: the rotation in float32 rounded once (within float32's error on the terms, then one rounding of
    # the dtype, of the exact value); eager PyTorch rounds its two products first, one unit of the terms more
    unit, terms = torch.finfo(dtype).eps, (projected.abs().max() * torch.cat([cos, sin]).abs().max()).item()
    rope_written = written_rows[..., latent_dim:]
    float32_error = 2 * torch.finfo(torch.float32).eps * terms
    torch.testing.assert_close(rope_written.double(), exact_rope_key, rtol=unit, atol=float32_error)
    torch.testing.assert_close(rope_written, rope_key, rtol=unit, atol=unit * terms)
    written = torch.zeros_like(buffer, dtype=torch.bool)
    written[:bsz, start : start + new_tokens] = True
    assert not buffer[~written].any()  # no other slot, no spare row


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("latent_dim, groups, rope_dim, interleave", SHAPES)
@pytest.mark.parametrize("heads", [1, 24])
def test_the_same_launch_returns_the_query_rope_heads_rotated_by_the_same_tables(
    dtype, latent_dim, groups, rope_dim, interleave, heads
):
    bsz, new_tokens = 2, 3
    norm = MLRARMSNorm(latent_dim, eps=1e-6, num_groups=groups).to(DEVICE, dtype)
    projected = draw(bsz, new_tokens, latent_dim + rope_dim, dtype=dtype, seed=6)
    cos = draw(bsz, new_tokens, rope_dim, dtype=dtype, seed=7)
    sin = draw(bsz, new_tokens, rope_dim, dtype=dtype, seed=8)
    query_rope = query_rope_view(bsz, new_tokens, heads, rope_dim, dtype, seed=9)
    buffer = torch.zeros(bsz, 4, latent_dim + rope_dim, dtype=dtype, device=DEVICE)
    rotated, _ = write_latent_rows(
        buffer, torch.tensor(0, device=DEVICE), projected, norm.weight, 1e-6, groups, 1.0, cos, sin, interleave,
        query_rope,
    )
    # in float32 rounded once, as the rope key (the test above): within float32's error on the terms of the exact
    # rotation, then one rounding; within a unit more of eager PyTorch's, which rounds its two products first
    exact = apply_rotary_pos_emb(query_rope.double(), cos.double(), sin.double(), interleave)
    unit, terms = torch.finfo(dtype).eps, (query_rope.abs().max() * torch.cat([cos, sin]).abs().max()).item()
    assert rotated.shape == (bsz, new_tokens, heads, rope_dim) and rotated.is_contiguous()
    torch.testing.assert_close(rotated.double(), exact, rtol=unit, atol=2 * torch.finfo(torch.float32).eps * terms)
    torch.testing.assert_close(
        rotated, apply_rotary_pos_emb(query_rope, cos, sin, interleave), rtol=unit, atol=unit * terms
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz, new_tokens", [(1, 1), (2, 3)])
def test_the_same_launch_folds_w_uk_into_the_query_and_writes_the_same_rows(dtype, bsz, new_tokens):
    """Given the fold's operands (views of the query projection's output and of the up-projection's weight, as
    `MLRAAttention.fold_operands` hands them over), the launch also returns the absorbed query x[g % h] @ W_UK[g]^T;
    the rows, the length and the rotated query are those of the launch without it."""
    heads, nope_dim, value_dim, block_dim, branches, latent_dim, groups, rope_dim = 3, 24, 16, 40, 2, 48, 2, 8
    norm, projected, cos, sin = latent_write_inputs(bsz, new_tokens, latent_dim, groups, rope_dim, seed=60)
    norm, projected, cos, sin = norm.to(dtype), projected.to(dtype), cos.to(dtype), sin.to(dtype)
    query = draw(bsz, new_tokens, heads, nope_dim + rope_dim, dtype=dtype, seed=64)
    q_nope, query_rope = query.split([nope_dim, rope_dim], dim=-1)
    rows = q_nope.permute(2, 0, 1, 3).reshape(heads, 1, bsz * new_tokens, nope_dim)
    up_weight = draw(branches, heads, nope_dim + value_dim, block_dim, dtype=dtype, seed=65, scale=0.2)
    w_uk = up_weight[:, :, :nope_dim]  # [B, h, d_n, d_l]
    fold = (rows, w_uk.transpose(-1, -2).flatten(0, 1)[:, None])

    def launch(fold):
        buffer = torch.zeros(bsz, 8, latent_dim + rope_dim, dtype=dtype, device=DEVICE)
        length = torch.tensor(2, device=DEVICE)
        rotated, absorbed = write_latent_rows(
            buffer, length, projected, norm.weight, 1e-6, groups, 1.3, cos, sin, False, query_rope, fold
        )
        return buffer, length, rotated, absorbed

    buffer, length, rotated, absorbed = launch(fold)
    plain_buffer, plain_length, plain_rotated, nothing = launch(None)
    expected = torch.einsum("hmk,bhkl->bhml", rows[:, 0].double(), w_uk.double()).flatten(0, 1)
    assert nothing is None and absorbed.shape == expected.shape
    error = ((absorbed.double() - expected).norm() / expected.norm()).item()
    assert error < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert torch.equal(buffer, plain_buffer) and torch.equal(rotated, plain_rotated)
    assert int(length) == int(plain_length) == 2 + new_tokens


def reference_rows(norm, projected, scale, cos, sin, interleave):
    """The rows the PyTorch path caches for projected [bsz, T, d_c + d_r]: [norm(latent) * scale | rope(k_rope)]."""
    latent_dim = norm.weight.shape[0]
    with torch.no_grad():
        latent = norm(projected[..., :latent_dim]) * scale
        rope_key = apply_rotary_pos_emb(projected[..., latent_dim:].unsqueeze(2), cos, sin, interleave).squeeze(2)
    return torch.cat([latent, rope_key], dim=-1)


def latent_write_inputs(bsz, new_tokens, latent_dim, groups, rope_dim, seed):
    """(norm, projected [bsz, T, d_c + d_r], cos, sin [bsz, T, d_r]) of float32 random values."""
    norm = MLRARMSNorm(latent_dim, eps=1e-6, num_groups=groups).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(1 + draw(latent_dim, dtype=torch.float32, seed=seed, scale=0.3))
    projected = draw(bsz, new_tokens, latent_dim + rope_dim, dtype=torch.float32, seed=seed + 1, scale=3.0)
    cos = draw(bsz, new_tokens, rope_dim, dtype=torch.float32, seed=seed + 2)
    sin = draw(bsz, new_tokens, rope_dim, dtype=torch.float32, seed=seed + 3)
    return norm, projected, cos, sin


@pytest.mark.parametrize("bsz, new_tokens", [(1, 1), (3, 1), (2, 3), (4, 4), (1, 16), (16, 1)])
def test_each_write_advances_the_length_by_its_new_tokens_and_the_next_write_follows_it(bsz, new_tokens):
    latent_dim, groups, rope_dim, steps = 24, 2, 6, 3
    buffer = torch.zeros(bsz, steps * new_tokens, latent_dim + rope_dim, device=DEVICE)  # filled exactly
    length = torch.tensor(0, device=DEVICE)
    for step in range(steps):
        norm, projected, cos, sin = latent_write_inputs(bsz, new_tokens, latent_dim, groups, rope_dim, seed=10 * step)
        query_rope = query_rope_view(bsz, new_tokens, 2, rope_dim, torch.float32, seed=10 * step + 4)
        write_latent_rows(buffer, length, projected, norm.weight, 1e-6, groups, 1.7, cos, sin, False, query_rope)
        assert int(length) == (step + 1) * new_tokens
        slots = slice(step * new_tokens, (step + 1) * new_tokens)
        expected = reference_rows(norm, projected, 1.7, cos, sin, False)
        torch.testing.assert_close(buffer[:, slots], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEVICE == "cuda", reason="a device-side assert ends the process's CUDA context (and its tests)")
def test_a_write_past_the_capacity_raises_and_changes_neither_the_buffer_nor_the_length():
    norm, projected, cos, sin = latent_write_inputs(2, 3, 16, 1, 8, seed=20)
    buffer = draw(2, 9, 24, dtype=torch.float32, seed=24)
    before, length = buffer.clone(), torch.tensor(7, device=DEVICE)
    message = (
        r"the static MLRACache is full \(max_cache_len=9\) and cannot take 3 more token\(s\): "
        r"pass a larger `max_cache_len` to MLRACache or a larger `max_length` to generate\(\)"
    )
    with pytest.raises(ValueError, match=message):
        write_latent_rows(
            buffer, length, projected, norm.weight, 1e-6, 1, 1.0, cos, sin, False,
            query_rope_view(2, 3, 2, 8, torch.float32, seed=21),
        )
    assert torch.equal(buffer, before)
    assert int(length) == 7


@pytest.mark.skipif(DEVICE == "cuda", reason="a device-side assert ends the process's CUDA context (and its tests)")
def test_the_kernel_itself_writes_nothing_and_keeps_the_length_where_the_rows_do_not_fit():
    """What a GPU does beside its device assert (Triton's interpreter skips device asserts: the launch runs on)."""
    norm, projected, cos, sin = latent_write_inputs(2, 3, 16, 1, 8, seed=25)
    buffer = draw(3, 9, 24, dtype=torch.float32, seed=29)  # a spare row: a stray store lands within the tensor
    before, length = buffer.clone(), torch.tensor(7, device=DEVICE)
    query_rope = query_rope_view(2, 3, 2, 8, torch.float32, seed=26)
    latent_write._launch_write(buffer, length, projected, norm.weight, 1e-6, 1, 1.0, cos, sin, False, query_rope, None)
    assert torch.equal(buffer, before)
    assert int(length) == 7


def test_more_rows_than_one_program_holds_are_refused():
    norm, projected, cos, sin = latent_write_inputs(3, 6, 16, 1, 8, seed=30)
    buffer, length = torch.zeros(3, 8, 24, device=DEVICE), torch.tensor(0, device=DEVICE)
    with pytest.raises(ValueError, match="at most 16 rows"):
        write_latent_rows(
            buffer, length, projected, norm.weight, 1e-6, 1, 1.0, cos, sin, False,
            query_rope_view(3, 6, 2, 8, torch.float32, seed=31),
        )


def test_a_buffer_of_another_width_or_dtype_is_refused():
    projected = draw(1, 1, 20, dtype=torch.float32, seed=5)
    weight, tables = torch.ones(16, device=DEVICE), draw(1, 1, 4, dtype=torch.float32, seed=6)
    start = torch.tensor(0, device=DEVICE)
    for buffer in (torch.zeros(1, 4, 24, device=DEVICE), torch.zeros(1, 4, 20, dtype=torch.float16, device=DEVICE)):
        with pytest.raises(ValueError, match="write_latent_rows needs a buffer"):
            write_latent_rows(
                buffer, start, projected, weight, 1e-6, 1, 1.0, tables, tables, False,
                query_rope_view(1, 1, 2, 4, torch.float32, seed=7),
            )


@pytest.mark.parametrize("member", FAMILY)
def test_decode_steps_into_a_static_cache_write_in_one_launch_and_match_the_plain_path(member, writes):
    fast = tiny_model(seed=30, **FAMILY[member], decode_kernel="triton").to(DEVICE)
    plain = tiny_model(seed=30, **FAMILY[member], decode_kernel="torch").to(DEVICE)
    ids = random_tokens((2, 8), seed=31).to(DEVICE)
    fast_cache, plain_cache = MLRACache(fast.config, max_cache_len=12), MLRACache(plain.config, max_cache_len=12)
    with torch.no_grad():
        fast(ids[:, :5], **cache_kwargs(fast_cache))  # the prefill initializes the layers (the PyTorch ops)
        plain(ids[:, :5], **cache_kwargs(plain_cache))
        assert writes == []
        for position in (5, 6, 7):
            step = fast(ids[:, position : position + 1], **cache_kwargs(fast_cache)).logits
            expected = plain(ids[:, position : position + 1], **cache_kwargs(plain_cache)).logits
            torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)
    assert writes == [1] * (3 * fast.config.num_hidden_layers)
    for fast_layer, plain_layer in zip(fast_cache.layers, plain_cache.layers):
        # the GEMV sums the projections in another order
        torch.testing.assert_close(fast_layer.buffer, plain_layer.buffer, rtol=1e-5, atol=1e-5)
        assert int(fast_layer.cumulative_length) == 8


def test_the_dynamic_cache_and_the_fp8_cache_keep_the_plain_write(writes):
    model = tiny_model(seed=32, decode_kernel="triton").to(DEVICE)
    ids = random_tokens((1, 4), seed=33).to(DEVICE)
    with torch.no_grad():
        for cache in (MLRACache(model.config), MLRACache(model.config, max_cache_len=8, dtype=torch.float8_e4m3fn)):
            model(ids[:, :3], **cache_kwargs(cache))
            model(ids[:, 3:], **cache_kwargs(cache))
    assert writes == []


def test_a_chunk_of_more_rows_than_one_program_holds_keeps_the_plain_write(writes):
    model = tiny_model(seed=38, decode_kernel="triton").to(DEVICE)
    ids = random_tokens((2, 12), seed=39).to(DEVICE)
    cache = MLRACache(model.config, max_cache_len=12)
    with torch.no_grad():
        model(ids[:, :3], **cache_kwargs(cache))
        model(ids[:, 3:], **cache_kwargs(cache))  # 2 x 9 new rows
    assert writes == []
    assert all(int(layer.cumulative_length) == 12 for layer in cache.layers)


@pytest.mark.skipif(DEVICE == "cuda", reason="a device-side assert ends the process's CUDA context (and its tests)")
def test_a_full_static_cache_still_fails_loudly():
    model = tiny_model(seed=34, decode_kernel="triton").to(DEVICE)
    ids = random_tokens((1, 5), seed=35).to(DEVICE)
    cache = MLRACache(model.config, max_cache_len=4)
    with torch.no_grad():
        model(ids[:, :4], **cache_kwargs(cache))
        with pytest.raises((ValueError, RuntimeError), match="static MLRACache is full"):
            model(ids[:, 4:], **cache_kwargs(cache))


def test_the_write_is_captured_by_torch_compile_and_mutates_the_buffer_and_the_length_in_place(writes):
    fast = tiny_model(seed=36, decode_kernel="triton").to(DEVICE)
    plain = tiny_model(seed=36, decode_kernel="torch").to(DEVICE)
    ids = random_tokens((1, 6), seed=37).to(DEVICE)
    fast_cache, plain_cache = MLRACache(fast.config, max_cache_len=8), MLRACache(plain.config, max_cache_len=8)
    torch._dynamo.reset()
    step = torch.compile(fast, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        fast(ids[:, :4], **cache_kwargs(fast_cache))
        plain(ids[:, :4], **cache_kwargs(plain_cache))
        buffers = [layer.buffer.data_ptr() for layer in fast_cache.layers]
        lengths = [layer.cumulative_length.data_ptr() for layer in fast_cache.layers]
        for position in (4, 5):
            logits = step(ids[:, position : position + 1], **cache_kwargs(fast_cache)).logits
            expected = plain(ids[:, position : position + 1], **cache_kwargs(plain_cache)).logits
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert len(writes) == 2 * fast.config.num_hidden_layers
    assert [layer.buffer.data_ptr() for layer in fast_cache.layers] == buffers
    assert [layer.cumulative_length.data_ptr() for layer in fast_cache.layers] == lengths
    assert [int(layer.cumulative_length) for layer in fast_cache.layers] == [6] * fast.config.num_hidden_layers
    for fast_layer, plain_layer in zip(fast_cache.layers, plain_cache.layers):
        # the GEMV sums the projections in another order
        torch.testing.assert_close(fast_layer.buffer, plain_layer.buffer, rtol=1e-5, atol=1e-5)
