"""FlashAttention (attention/flash.py) against an independent float64 reference written here from the formula
softmax(Q K^T * scale + mask) V, plus merge_partials, the registry kernel and whole-model parity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import ModelConfig, build_model
from attnlab.attention import flash_attention, get_kernel, merge_partials
from attnlab.attention.tiles import (
    backward_rows,
    default_block_sizes,
    flat_rows,
    forward_rows,
    from_rows,
    tile_plan,
)


def reference(q, k, v, *, causal=False, mask=None, scale=None):
    """Float64, materialised scores, K/V repeated per query head: (out (B, H, Tq, D), lse (B, H, Tq))."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    G = H // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, H, Tk, D)
    scale = 1 / math.sqrt(D) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale  # (B, H, Tq, Tk)
    allowed = torch.ones(B, 1, Tq, Tk, dtype=torch.bool)
    if causal:
        qpos = torch.arange(Tk - Tq, Tk)[:, None]  # bottom-right aligned
        allowed = allowed & (torch.arange(Tk)[None, :] <= qpos)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Tq)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None]).nan_to_num(0.0)
    return p @ v, lse


def finite(lse):
    return lse.masked_fill(torch.isinf(lse), 0.0)


def make(B, H, K, Tq, Tk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, K, Tk, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, K, Tk, D, generator=g).to(dtype).requires_grad_()
    return q, k, v


def check_against_reference(q, k, v, *, causal, mask, block_q, block_k, tol, scale=None):
    out, lse = flash_attention(q, k, v, causal=causal, key_padding_mask=mask, scale=scale, block_q=block_q, block_k=block_k)
    ref_out, ref_lse = reference(q, k, v, causal=causal, mask=mask, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32) and lse.shape == q.shape[:3]
    assert torch.isfinite(out).all()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)) and not torch.isnan(lse).any()
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(finite(lse).double(), finite(ref_lse), **tol)

    g = torch.Generator().manual_seed(1)
    d_out = torch.randn(out.shape, generator=g).to(out.dtype).float()  # the gradient reaching out has its dtype
    d_lse = torch.randn(lse.shape, generator=g)
    grads = torch.autograd.grad((out.float() * d_out).sum() + (finite(lse) * d_lse).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref_out * d_out.double()).sum() + (finite(ref_lse) * d_lse.double()).sum(), (q, k, v))
    for name, got, want in zip("qkv", grads, ref_grads):
        assert got.dtype == q.dtype and torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want.double(), **tol, msg=lambda m, n=name: f"d{n}: {m}")


FP32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=2e-2, atol=2e-2)


@st.composite
def cases(draw):
    B = draw(st.integers(1, 2))
    K = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2, 3, 4]))
    Tq = draw(st.integers(1, 33))
    Tk = draw(st.integers(1, 33))
    D = draw(st.sampled_from([4, 8, 16]))
    causal = draw(st.booleans())
    mask_kind = draw(st.sampled_from(["none", "random", "one_row_empty", "prefix"]))
    mask = None
    if mask_kind != "none":
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        mask = torch.rand(B, Tk, generator=g) > 0.3
        if mask_kind == "one_row_empty":
            mask[0] = False  # every query of batch row 0 has nothing to attend to
        elif mask_kind == "prefix":
            mask[:] = True
            mask[:, : draw(st.integers(0, Tk))] = False  # left padding
    block_q = draw(st.sampled_from([None, 1, 3, 5, 8, 16]))
    block_k = draw(st.sampled_from([None, 1, 4, 7, 16]))
    seed = draw(st.integers(0, 2**16))
    return (B, K * G, K, Tq, Tk, D), causal, mask, block_q, block_k, seed


@settings(max_examples=100, deadline=None)
@given(cases())
def test_fp32_matches_float64_reference(case):
    shape, causal, mask, block_q, block_k, seed = case
    q, k, v = make(*shape, torch.float32, seed)
    check_against_reference(q, k, v, causal=causal, mask=mask, block_q=block_q, block_k=block_k, tol=FP32)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_bf16_matches_float64_reference(case):
    shape, causal, mask, block_q, block_k, seed = case
    q, k, v = make(*shape, torch.bfloat16, seed)
    check_against_reference(q, k, v, causal=causal, mask=mask, block_q=block_q, block_k=block_k, tol=BF16)


def test_default_tiles_at_a_length_that_is_not_a_tile_multiple():
    # 700 keys: two key tiles (512 + 188), two query tiles (256 + 256 + 188 queries... as chosen by default).
    assert default_block_sizes(700, 700) == (256, 512)
    q, k, v = make(1, 4, 2, 700, 700, 8, torch.float32)
    mask = torch.ones(1, 700, dtype=torch.bool)
    mask[0, 600:] = False
    for causal in (False, True):
        check_against_reference(q, k, v, causal=causal, mask=mask, block_q=None, block_k=None, tol=FP32)


def test_explicit_scale_and_float64_gradcheck():
    q, k, v = make(1, 4, 2, 6, 9, 4, torch.float64)
    mask = torch.tensor([[True] * 7 + [False] * 2])
    check_against_reference(q, k, v, causal=True, mask=mask, block_q=4, block_k=4, tol=dict(rtol=1e-10, atol=1e-10), scale=0.3)

    def fn(q, k, v):
        out, lse = flash_attention(q, k, v, causal=True, key_padding_mask=mask, block_q=2, block_k=3)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_fully_masked_rows_are_zero_with_minus_inf_lse_and_finite_gradients():
    q, k, v = make(2, 4, 1, 5, 6, 8, torch.float32)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False  # batch row 1: no key at all
    out, lse = flash_attention(q, k, v, key_padding_mask=mask, block_k=4)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(lse[0]).all()
    (out.sum() + finite(lse).sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))

    # causal with more queries than keys: the first Tq - Tk queries sit before every key
    q, k, v = make(1, 2, 2, 9, 4, 8, torch.float32)
    out, lse = flash_attention(q, k, v, causal=True, block_q=2, block_k=2)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5])) and torch.isneginf(lse[:, :, :5]).all()
    assert torch.isfinite(lse[:, :, 5:]).all()


def test_causal_skips_future_tiles_and_trims_the_diagonal():
    plan = tile_plan(64, 64, 16, 16, causal=True)
    assert [len(tiles) for _, _, tiles in plan] == [1, 2, 3, 4]  # 10 of the 16 tiles
    assert all(diag == (j0 == i0) for i0, _, tiles in plan for j0, _, diag in tiles)
    # bottom-right alignment: 8 queries over 64 keys sit at positions 56..63
    (i0, i1, tiles), = tile_plan(8, 64, 8, 32, causal=True)
    assert tiles == [(0, 32, False), (32, 64, True)]
    # a key tile reaching past a query tile's last position is trimmed to it
    assert tile_plan(4, 4, 2, 4, causal=True)[0][2] == [(0, 2, True)]
    assert sum(len(t) for _, _, t in tile_plan(64, 64, 16, 16, causal=False)) == 16


def test_merge_partials_of_two_key_halves_equals_attention_over_all_keys():
    q, k, v = make(2, 6, 3, 7, 20, 8, torch.float64)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, :10] = False  # batch row 1: the first half is empty -> its lse is -inf
    out_a, lse_a = flash_attention(q, k[:, :, :10], v[:, :, :10], key_padding_mask=mask[:, :10])
    out_b, lse_b = flash_attention(q, k[:, :, 10:], v[:, :, 10:], key_padding_mask=mask[:, 10:])
    assert torch.isneginf(lse_a[1]).all()
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = reference(q, k, v, mask=mask)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


def test_merge_partials_handles_empty_sides_without_nan():
    out_a = torch.randn(1, 2, 3, 4, requires_grad=True)
    out_b = torch.randn(1, 2, 3, 4, requires_grad=True)
    lse_a = torch.tensor([[[0.5, float("-inf"), float("-inf")]] * 2], requires_grad=True)
    lse_b = torch.tensor([[[float("-inf"), 1.0, float("-inf")]] * 2], requires_grad=True)
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out[:, :, 0], out_a[:, :, 0])
    torch.testing.assert_close(out[:, :, 1], out_b[:, :, 1])
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2])) and torch.isneginf(lse[:, :, 2]).all()
    (out.sum() + finite(lse).sum()).backward()
    for t in (out_a, out_b, lse_a, lse_b):
        assert torch.isfinite(t.grad).all()
    with pytest.raises(ValueError, match="same shape"):
        merge_partials(out_a, lse_a, out_b[:, :1], lse_b)
    with pytest.raises(ValueError, match="lse_a and lse_b"):
        merge_partials(out_a, lse_a[..., :2], out_b, lse_b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_rows_continues_a_partial_result_in_place_like_merge_partials(dtype):
    """What ring attention relies on: the in-place forward started from (out, lse) of some keys equals
    merge_partials with the result over the other keys, and attention over all keys; rows empty on one
    side or both (lse = -inf) included."""
    B, H, K, Tq, Tk, D = 2, 6, 3, 7, 20, 8
    G = H // K
    q, k, v = (t.detach() for t in make(B, H, K, Tq, Tk, D, dtype))
    mask = torch.ones(B, Tk, dtype=torch.bool)
    mask[1, :10] = False  # batch 1: the first half is empty (-inf lse before continuing)
    mask[0, 10:] = False  # batch 0: the second half adds nothing
    out_a, lse_a = flash_attention(q, k[:, :, :10], v[:, :, :10], key_padding_mask=mask[:, :10], block_q=3, block_k=4)
    out_b, lse_b = flash_attention(q, k[:, :, 10:], v[:, :, 10:], key_padding_mask=mask[:, 10:], block_q=3, block_k=4)
    acc = torch.promote_types(dtype, torch.float32)
    out, lse = flat_rows(out_a.to(acc), K).clone(), flat_rows(lse_a, K).clone()  # (BK, Tq*G, D), (BK, Tq*G)
    forward_rows(flat_rows(q, K), k[:, :, 10:].reshape(B * K, 10, D), v[:, :, 10:].reshape(B * K, 10, D),
                 mask[:, 10:], G, False, 1 / math.sqrt(D), 3, 4, out, lse)
    out, lse = from_rows(out.view(B, K, Tq * G, D), G), from_rows(lse.view(B, K, Tq * G), G)
    merged_out, merged_lse = merge_partials(out_a, lse_a, out_b, lse_b)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.to(dtype), merged_out, **tol)
    torch.testing.assert_close(lse, merged_lse, **tol)
    ref_out, ref_lse = reference(q, k, v, mask=mask)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, **tol)
    # a row with no key on either side stays zeros and -inf
    empty_out, empty_lse = torch.zeros(1, G, D, dtype=acc), torch.full((1, G), float("-inf"), dtype=acc)
    forward_rows(q[:1, :G, :1].reshape(1, G, D), k[:1, 0], v[:1, 0], torch.zeros(1, Tk, dtype=torch.bool), G,
                 False, 1.0, 1, 4, empty_out, empty_lse)
    assert torch.equal(empty_out, torch.zeros_like(empty_out)) and torch.isneginf(empty_lse).all()


def test_backward_rows_accumulates_into_given_gradients():
    """Gradients of two key halves accumulated into one dq (and disjoint dk/dv slices) equal the full backward."""
    B, H, K, T, D = 1, 4, 2, 9, 8
    G = H // K
    q, k, v = make(B, H, K, T, T, D, torch.float64)
    out, lse = flash_attention(q, k, v, causal=False)
    dout = torch.randn_like(out)
    out.backward(dout)
    dq, dk, dv = (torch.zeros(B * K, n, D, dtype=torch.float64) for n in (T * G, T, T))
    args = [flat_rows(t.detach(), K) for t in (q, out, lse, dout)]
    kr, vr = (t.detach().reshape(B * K, T, D) for t in (k, v))
    for cols in (slice(0, 4), slice(4, T)):
        backward_rows(args[0], kr[:, cols], vr[:, cols], args[1], args[2], args[3], None, None, G, False,
                      1 / math.sqrt(D), 2, 3, dq, dk[:, cols], dv[:, cols])
    torch.testing.assert_close(from_rows(dq.view(B, K, T * G, D), G), q.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dk.view(k.shape), k.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dv.view(v.shape), v.grad, rtol=1e-12, atol=1e-12)


def test_registry_kernel_matches_naive():
    flash, naive = get_kernel("flash"), get_kernel("naive")
    q, k, v = make(2, 4, 2, 5, 11, 8, torch.float32)
    mask = torch.rand(2, 11) > 0.2
    got, lse = flash(q, k, v, causal=True, mask=mask, scale=None)
    want, want_lse = naive(q, k, v, causal=True, mask=mask, scale=None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(finite(lse), finite(want_lse), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "q_shape, kv_shape, mask, kwargs, match",
    [
        ((1, 4, 5), (1, 2, 5, 8), None, {}, "4-D"),
        ((1, 4, 5, 8), (1, 3, 5, 8), None, {}, "multiple"),
        ((1, 4, 5, 8), (1, 2, 5, 4), None, {}, "k and v"),
        ((1, 4, 5, 8), (1, 2, 6, 8), torch.ones(1, 5, dtype=torch.bool), {}, "key padding mask"),
        ((1, 4, 5, 8), (1, 2, 6, 8), torch.ones(1, 6), {}, "key padding mask"),
        ((1, 4, 5, 8), (1, 2, 6, 8), None, {"block_q": 0}, "block_q"),
        ((1, 4, 5, 8), (1, 2, 6, 8), None, {"block_k": -3}, "block_k"),
    ],
)
def test_bad_inputs_raise_value_error(q_shape, kv_shape, mask, kwargs, match):
    q, k = torch.randn(*q_shape), torch.randn(*kv_shape)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, k, key_padding_mask=mask, **kwargs)


def test_mixed_or_integer_dtypes_raise_value_error():
    q, k, v = make(1, 2, 1, 3, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q, k.bfloat16(), v)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q.long(), k.long(), v.long())


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64,
                attention_kernel="naive")
    base.update(kw)
    return ModelConfig(**base)


def test_whole_model_flash_equals_naive_logits_and_gradients():
    cfg = tiny()
    ref = build_model(cfg)
    model = build_model(cfg.replace(attention_kernel="flash"))
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (3, 21))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding
    losses = []
    for m in (ref, model):
        logits = m(ids, attention_mask=mask)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = (loss * mask[:, 1:].flatten()).sum() / mask[:, 1:].sum()
        loss.backward()
        losses.append(logits)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_cached_decode_with_flash_equals_full_forward():
    cfg = tiny(attention_kernel="flash")
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 15))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 20)
        parts = [model(ids[:, :6], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(6, 10)]
        parts.append(model(ids[:, 10:], cache=cache))  # a chunk of several queries over a longer cache
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
