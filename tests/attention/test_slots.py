"""The static-slot decode kernel (attention/slots.py) is attention: out and lse against a float64 softmax over
each query's visible slots, whatever the mask; a query that sees nothing gives zeros and lse = -inf."""

from __future__ import annotations

import pytest
import torch

from attnlab.attention.kernels import get_kernel
from attnlab.attention.slots import SLOT_BLOCK, static_slots_attention


@pytest.mark.parametrize("S", [40, SLOT_BLOCK, 2 * SLOT_BLOCK])  # one block of S, or blocks of 256
@pytest.mark.parametrize("scale", [None, 0.3])
def test_out_and_lse_match_a_float64_softmax(S, scale):
    g = torch.Generator().manual_seed(S)
    B, H, K, n, D = 2, 6, 2, 3, 16
    q = torch.randn(B, H, n, D, generator=g)
    k, v = torch.randn(B, K, S, D, generator=g), torch.randn(B, K, S, D, generator=g)
    mask = torch.rand(B, n, S, generator=g) < 0.6  # any pattern: the kernel applies exactly this mask
    mask[1, 2] = False  # a query that sees no slot
    out, lse = get_kernel("static_slots")(q, k, v, causal=True, mask=mask, scale=scale)
    s = (q.double().view(B, K, H // K, n, D) @ k.double()[:, :, None].transpose(-1, -2))  # (B, K, G, n, S)
    s = (s * (D ** -0.5 if scale is None else scale)).masked_fill(~mask[:, None, None], float("-inf"))
    want_lse = torch.logsumexp(s, dim=-1).reshape(B, H, n)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    want = (p @ v.double()[:, :, None]).reshape(B, H, n, D)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=1e-5)
    assert torch.isneginf(lse[1, :, 2]).all() and bool((out[1, :, 2] == 0).all())


def test_it_needs_the_per_query_mask():
    q, k = torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"\(B, n, S\) per-query mask"):
        static_slots_attention(q, k, k, causal=True, mask=None, scale=None)
    with pytest.raises(ValueError, match=r"\(B, n, S\) per-query mask"):
        static_slots_attention(q, k, k, causal=True, mask=torch.ones(1, 8, dtype=torch.bool), scale=None)
