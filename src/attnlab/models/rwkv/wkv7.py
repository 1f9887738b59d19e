"""The RWKV-7 state update — the generalised delta rule — recurrent and chunked (Peng et al. 2025, "RWKV-7
'Goose' with Expressive Dynamic State Evolution", arXiv 2503.14456).

Orientation. Per head the state ``S`` is an (N x N) matrix whose *rows are value channels and columns key
channels* (the reference implementation's layout); vectors below are columns. One token updates it as

    S_t = S_{t-1} (diag(w_t) + α_t β_tᵀ) + v_t k_tᵀ,        o_t = S_t r_t

with ``α = -κ̂`` and ``β = κ̂ ⊙ a`` (``κ̂`` the L2-normalised key, ``a`` the in-context learning rate).
This is the paper's ``wkv_t = wkv_{t-1} (diag(w_t) - κ̂_tᵀ (a_t ⊙ κ̂_t)) + v_tᵀ k̃_t`` with its row vectors
written as columns: the decay scales the *key* columns of ``S``, the rank-one term removes ``a``-weighted
parts of what ``S`` already returns for the key direction ``κ̂``, and ``v kᵀ`` writes the new pair.
``w_t`` is given as its logarithm ``log w_t`` (< 0); everything is float32.

``wkv7_step`` applies that update once. ``wkv7_chunked`` computes chunks of ``CHUNK`` tokens at once; in a
chunk that starts from the state ``S_0``, with the cumulative decay ``γ_t = Π_{s<=t} w_s`` (per key channel)
and the read-outs ``z_t = S_{t-1} α_t``, unrolling the recurrence gives

    S_t = S_0 diag(γ_t) + Σ_{i<=t} (z_i (β_i ⊙ γ_t/γ_i)ᵀ + v_i (k_i ⊙ γ_t/γ_i)ᵀ)
    z_t = S_0 (α_t ⊙ γ_{t-1}) + Σ_{i<t} (z_i (β_i ⊙ γ_{t-1}/γ_i)ᵀ α_t + v_i (k_i ⊙ γ_{t-1}/γ_i)ᵀ α_t)

so the ``z`` of a chunk solve one unit lower-triangular (L x L) system (``solve_triangular``, with autograd),
after which outputs and the end-of-chunk state are matrix products. Ratios ``γ_t/γ_i`` are formed as
``(x ⊙ γ_t) · (y / γ_i)``: that needs ``1/γ`` to stay finite over one chunk, which holds because the model's
decay keeps ``log w > -e^{-1/2}`` (so ``1/γ < e^{0.61 L}``, 3e8 for L = 32). The two forms agree to float
rounding (tested), and the chunked one makes O(T / CHUNK) Python calls per layer.

Shape legend: B batch, T time, H heads, N head size, L chunk length.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 32


def wkv7_step(r: Tensor, logw: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
              S: Tensor) -> tuple[Tensor, Tensor]:
    """One token: r, logw, k, v, alpha, beta (B, H, N) fp32, S (B, H, N, N) -> o (B, H, N), next S."""
    with torch.autocast(r.device.type, enabled=False):  # the state stays fp32 under bf16 autocast too
        return _step(r, logw, k, v, alpha, beta, S)


def _step(r: Tensor, logw: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor,
          S: Tensor) -> tuple[Tensor, Tensor]:
    S = (S * torch.exp(logw)[:, :, None, :]  # decay each key column
         + (S @ alpha[..., None]) * beta[:, :, None, :]  # (S α) βᵀ
         + v[..., None] * k[:, :, None, :])  # v kᵀ
    return (S @ r[..., None])[..., 0], S


def wkv7_chunked(r: Tensor, logw: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, S: Tensor | None,
                 chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """A sequence: r, logw, k, v, alpha, beta (B, T, H, N) fp32, S (B, H, N, N) or None (zeros)
    -> o (B, T, H, N) and the state after the last token."""
    with torch.autocast(r.device.type, enabled=False):  # fp32 matrix products under bf16 autocast too
        return _chunked(r, logw, k, v, alpha, beta, S, chunk)


def _chunked(r: Tensor, logw: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, S: Tensor | None,
             chunk: int) -> tuple[Tensor, Tensor]:
    B, T, H, N = r.shape
    r, logw, k, v, alpha, beta = (x.transpose(1, 2) for x in (r, logw, k, v, alpha, beta))  # (B, H, T, N)
    if S is None:
        S = r.new_zeros(B, H, N, N)
    outs = []
    for start in range(0, T, chunk):
        rc, wc, kc, vc, ac, bc = (x[:, :, start:start + chunk] for x in (r, logw, k, v, alpha, beta))  # (B, H, L, N)
        L = rc.shape[2]
        cum = wc.cumsum(dim=2)  # log γ_t, decay up to and including t
        r_dec = rc * torch.exp(cum)  # r_t ⊙ γ_t
        a_dec = ac * torch.exp(cum - wc)  # α_t ⊙ γ_{t-1}
        shrink = torch.exp(-cum)
        k_inv, b_inv = kc * shrink, bc * shrink  # k_i / γ_i, β_i / γ_i
        ones = torch.ones(L, L, dtype=torch.bool, device=r.device)
        past, upto = torch.tril(ones, -1), torch.tril(ones)  # i < t, i <= t
        kT, bT = k_inv.transpose(-1, -2), b_inv.transpose(-1, -2)  # (B, H, N, L)
        St = S.transpose(-1, -2)  # (B, H, N_k, N_v)
        m_ab = (a_dec @ bT).masked_fill(~past, 0.0)  # (B, H, L, L): z_i -> z_t
        m_ak = (a_dec @ kT).masked_fill(~past, 0.0)  # v_i -> z_t
        rhs = a_dec @ St + m_ak @ vc  # (B, H, L, N_v)
        eye = torch.eye(L, dtype=r.dtype, device=r.device)
        z = torch.linalg.solve_triangular(eye - m_ab, rhs, upper=False, unitriangular=True)  # (B, H, L, N_v)
        out = (r_dec @ St + (r_dec @ bT).masked_fill(~upto, 0.0) @ z
               + (r_dec @ kT).masked_fill(~upto, 0.0) @ vc)  # (B, H, L, N_v)
        outs.append(out)
        tail = torch.exp(cum[:, :, -1:] - cum)  # γ_L / γ_i <= 1
        S = (S * torch.exp(cum[:, :, -1])[:, :, None, :]
             + z.transpose(-1, -2) @ (bc * tail) + vc.transpose(-1, -2) @ (kc * tail))  # (B, H, N_v, N_k)
    return torch.cat(outs, dim=2).transpose(1, 2), S
