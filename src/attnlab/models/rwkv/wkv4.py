"""The RWKV-4 WKV operator, recurrent and chunked, in log space (Peng et al. 2023).

The state after the tokens before t is ``S = Σ_{i<t} e^{-(t-1-i)w + k_i} (v_i, 1)`` — a weighted sum of
values and its normaliser. Exponentials of sums of keys overflow within a few hundred tokens, so the state
is kept as ``(num, den, p)`` with ``S = (num, den) · e^p`` and every combination is rescaled by the
largest exponent involved (the "max trick"). ``wkv_step`` applies the definition one token at a time;
``wkv_chunked`` computes chunks of tokens at once from a (T_c x T_c) matrix of log-weights per channel and
carries the state between chunks — the same numbers up to float rounding (tested), with autograd through
both.

Shape legend: B batch, T time, C channels, N chunk length. ``w`` (C,) is the log decay per step (< 0),
``u`` (C,) the bonus of the current token.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 32
EMPTY = -1e38  # log-scale of an empty state (e^p = 0 without an infinity)


def wkv_step(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict]:
    """One token: k, v (B, C) fp32 -> wkv (B, C) and the next (num, den, p)."""
    num, den, p = state["num"], state["den"], state["p"]
    m = torch.maximum(p, u + k)
    a, b = torch.exp(p - m), torch.exp(u + k - m)
    out = (a * num + b * v) / (a * den + b)
    m2 = torch.maximum(p + w, k)
    a, b = torch.exp(p + w - m2), torch.exp(k - m2)
    return out, {"num": a * num + b * v, "den": a * den + b, "p": m2}


def wkv_chunked(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: dict[str, Tensor] | None,
                chunk: int = CHUNK) -> tuple[Tensor, dict]:
    """A sequence: k, v (B, T, C) fp32 -> wkv (B, T, C) and the state after the last token."""
    B, T, C = k.shape
    if state is None:
        num = torch.zeros(B, C, dtype=k.dtype, device=k.device)
        den = torch.zeros_like(num)
        p = torch.full_like(num, EMPTY)
    else:
        num, den, p = state["num"], state["den"], state["p"]
    outs = []
    for start in range(0, T, chunk):
        kc, vc = k[:, start:start + chunk], v[:, start:start + chunk]  # (B, N, C)
        N = kc.shape[1]
        t = torch.arange(N, device=k.device, dtype=k.dtype)
        lag = (t[:, None] - 1 - t[None, :])  # (N, N): steps of decay from token i to the query at t
        logw = lag[:, :, None] * w + kc[:, None, :, :]  # (B, N, N, C): past tokens i < t
        diag = torch.eye(N, dtype=torch.bool, device=k.device)
        logw = torch.where(diag[:, :, None], (u + kc)[:, :, None, :], logw)  # the current token: bonus u
        future = (t[None, :] > t[:, None])[:, :, None]  # i > t
        logw = logw.masked_fill(future, float("-inf"))
        s = p[:, None, :] + t[None, :, None] * w  # (B, N, C): the carried state, decayed t steps
        m = torch.maximum(logw.amax(dim=2), s)  # (B, N, C)
        e = torch.exp(logw - m[:, :, None, :])  # (B, N, N, C)
        es = torch.exp(s - m)
        top = (e * vc[:, None, :, :]).sum(dim=2) + es * num[:, None]
        bottom = e.sum(dim=2) + es * den[:, None]
        outs.append(top / bottom)
        # the state after the chunk: every token decayed to the end, plus the carried state
        tail = (N - 1 - t)[None, :, None] * w + kc  # (B, N, C)
        s_end = p + N * w
        m_end = torch.maximum(tail.amax(dim=1), s_end)
        et, es_end = torch.exp(tail - m_end[:, None]), torch.exp(s_end - m_end)
        num = (et * vc).sum(dim=1) + es_end * num
        den = et.sum(dim=1) + es_end * den
        p = m_end
    return torch.cat(outs, dim=1), {"num": num, "den": den, "p": p}
