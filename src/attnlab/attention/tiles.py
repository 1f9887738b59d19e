"""The tile engine: exact softmax attention over row blocks with an online softmax, forward and backward,
shared by FlashAttention (flash.py) and ring attention (ring.py). Plain PyTorch, no C++.

Forward (Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness";
loop order and backward of Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning"): for each tile of queries, walk over the tiles of keys keeping per row a running maximum
``m``, a running softmax denominator ``l`` and an unnormalised output ``acc``. A new key tile with scores
``s`` updates them by the online-softmax rescaling (Milakov & Gimelshein 2018)::

    m' = max(m, rowmax(s));  p = exp(s - m');  alpha = exp(m - m')
    l' = alpha * l + rowsum(p);  acc' = alpha * acc + p @ v

and at the end ``out = acc / l``, ``lse = m + log l``. This is the same identity as ``merge_partials``
(merge.py), applied to an unnormalised accumulator so each tile costs one rescale. A normalised partial
result (out, lse) is the state acc = out, m = lse, l = 1, so ``forward_rows`` *continues* attention over
the keys seen so far with more keys, in place: ring attention calls it once per K/V block of the ring.

Backward recomputes the scores of each tile from Q, K and the saved log-sum-exp instead of storing the
probabilities, so training memory is O(T)::

    p = exp(s - lse);  dV += p^T dO;  dP = dO V^T;  dS = p * (dP - Delta);  dQ += dS K;  dK += dS^T Q
    with Delta = rowsum(dO * O) - dlse   (dlse: the gradient reaching the returned lse, usually 0)

Only the global lse and O are needed, so ``backward_rows`` over any split of the keys (the blocks of a
ring) accumulates the exact gradients of attention over all of them.

Row layout (grouped-query / multi-query attention): the query heads sharing a K/V head are folded into the
rows of a query tile (row = query * G + group member, ``to_rows``/``flat_rows``/``from_rows``), so one
matmul against the shared K/V tile serves the whole group and K/V are never repeated; dK/dV sum over the
group for free in ``p^T dO`` and ``dS^T Q``.

Causal masking is bottom-right aligned (query i of Tq sits at absolute position Tk - Tq + i, as in
masks.py); ``tile_plan`` skips key tiles in the future of a whole query tile and masks only the tiles
straddling the diagonal.

Shape legend: B batch, H query heads, K key/value heads, G = H // K query heads per K/V head,
Tq queries, Tk keys, D head dim, BK = B * K, R = bq * G rows of a query tile, bq/bk queries/keys per tile.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["TilePlan", "backward_rows", "default_block_sizes", "flat_rows", "forward_rows", "from_rows",
           "tile_plan", "to_rows"]

_NEG_INF = float("-inf")
# exp2 is markedly faster than exp on CPU (about 3x here), so tiles work in base 2: q is pre-scaled by
# log2(e), 2^(s * log2 e) = e^s, and the lse is converted back to base e (times ln 2) on the way out.
_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)
# One (key tile, needs a causal mask) entry per visited key tile of a query tile.
TilePlan = list[tuple[int, int, list[tuple[int, int, bool]]]]


def default_block_sizes(tq: int, tk: int, groups: int = 1) -> tuple[int, int]:
    """Tile sizes (queries, keys) for a sequence length.

    Sequences up to the tile size are one tile; longer ones use big tiles (256 queries x 512 keys), which
    amortise the Python cost of each tile (a handful of tensor ops) while one score tile,
    ``B * H * bq * bk`` floats, stays a constant independent of T. With GQA the G query heads of a group
    share a tile's rows (R = bq * G), so query tiles shrink with G; 512 rows measured best for G > 1
    (``attnlab bench attention``, 2-core CPU).
    """
    groups = max(1, groups)
    block_k = min(tk, 512)
    block_q = min(tq, 256 if groups == 1 else max(16, 512 // groups))
    return max(1, block_q), max(1, block_k)


def tile_plan(tq: int, tk: int, bq: int, bk: int, causal: bool) -> TilePlan:
    """For each query tile [i0, i1): the key tiles [j0, j1) it must visit and whether a mask is needed.

    Causal (bottom-right aligned): query i sits at absolute position ``tk - tq + i`` and sees keys at
    positions <= its own. Key tiles entirely in the future of a query tile are skipped; tiles entirely in
    its past need no mask; only the tiles straddling the diagonal are masked. A single query (decode step)
    sits at the last position and sees every key, as in masks.build_bool_mask.
    """
    causal = causal and tq > 1
    offset = tk - tq
    plan: TilePlan = []
    for i0 in range(0, tq, bq):
        i1 = min(i0 + bq, tq)
        first, last = offset + i0, offset + i1 - 1  # absolute positions of the tile's first and last query
        tiles: list[tuple[int, int, bool]] = []
        for j0 in range(0, tk, bk):
            j1 = min(j0 + bk, tk)
            if causal and j0 > last:
                break  # this and every later key tile is in the future of all the tile's queries
            if causal:
                j1 = min(j1, last + 1)  # trim the keys in the future of every query of the tile
            tiles.append((j0, j1, causal and j1 - 1 > first))
        plan.append((i0, i1, tiles))
    return plan


def to_rows(x: Tensor, kv_heads: int) -> Tensor:
    """(B, H, T, ...) -> (B, K, T * G, ...): the G query heads of each K/V head folded query-major into rows."""
    B, H, T = x.shape[:3]
    G = H // kv_heads
    rest = x.shape[3:]
    if G == 1:
        return x
    x = x.reshape(B, kv_heads, G, T, *rest).transpose(2, 3)  # (B, K, T, G, ...)
    return x.reshape(B, kv_heads, T * G, *rest)


def flat_rows(x: Tensor, kv_heads: int) -> Tensor:
    """(B, H, T, ...) -> (B*K, T*G, ...): ``to_rows`` with batch and K/V heads merged; a view when G = 1 and the
    layout allows (contiguous inputs), else a copy."""
    x = to_rows(x, kv_heads)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def from_rows(x: Tensor, groups: int) -> Tensor:
    """Inverse of ``to_rows``: (B, K, T * G, ...) -> (B, K * G, T, ...)."""
    if groups == 1:
        return x
    B, K, TG = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(B, K, TG // groups, groups, *rest).transpose(2, 3)  # (B, K, G, T, ...)
    return x.reshape(B, K * groups, TG // groups, *rest)


def _causal_allowed(i0: int, i1: int, j0: int, j1: int, offset: int, groups: int, device: torch.device) -> Tensor:
    """(R, bk) bool, True where row (query i0 + r // G) may see key j0 + c under the causal rule."""
    qpos = torch.arange(offset + i0, offset + i1, device=device).repeat_interleave(groups)  # (R,)
    kpos = torch.arange(j0, j1, device=device)  # (bk,)
    return kpos[None, :] <= qpos[:, None]


def _masked_scores(
    qt: Tensor, kt: Tensor, *, diag: bool, pad: Tensor | None, i0: int, i1: int, j0: int, offset: int, groups: int
) -> Tensor:
    """Scores of one tile, -inf where masked: (BK, R, D) x (BK, bk, D) -> (BK, R, bk)."""
    s = torch.bmm(qt, kt.transpose(1, 2))  # (BK, R, bk); q was pre-scaled
    if diag:
        allowed = _causal_allowed(i0, i1, j0, j0 + kt.shape[1], offset, groups, s.device)  # (R, bk)
        s.masked_fill_(~allowed, _NEG_INF)
    if pad is not None:
        s.masked_fill_(~pad, _NEG_INF)  # pad: (BK, 1, bk), broadcast over the rows
    return s


def _key_tile_padding(mask: Tensor | None, j0: int, j1: int, kv_heads: int) -> tuple[bool, Tensor | None]:
    """(skip, pad): skip a key tile no row may attend to; pad (BK, 1, bk) is None if every key is allowed."""
    if mask is None:
        return False, None
    tile = mask[:, j0:j1]  # (B, bk)
    if bool(tile.all()):
        return False, None
    return (not bool(tile.any())), tile.repeat_interleave(kv_heads, dim=0)[:, None, :]  # (B*K, 1, bk)


def forward_rows(
    qr: Tensor, kr: Tensor, vr: Tensor, mask: Tensor | None, groups: int, causal: bool, scale: float, bq: int, bk: int,
    out: Tensor, lse: Tensor,
) -> None:
    """Tiled online-softmax forward *in place*, continuing from a partial result.

    qr (BK, Tq*G, D) query rows, kr/vr (BK, Tk, D), any float dtype; mask (BK / K', Tk) bool key padding whose
    rows repeat over the K' = BK / mask rows heads of each batch element. out (BK, Tq*G, D) and lse (BK, Tq*G)
    (float32+, lse in base e) hold attention over the keys seen so far (zeros and -inf: none yet) and are
    updated to attention over those keys and these: a normalised partial result is the online-softmax state
    acc = out, m = lse, l = 1, so continuing from it applies the identity of ``merge_partials`` without a temporary.
    Allocates only per tile (independent of Tq and Tk), plus float32 copies of K/V if they are not float32.
    """
    BK, TG, D = qr.shape
    G, Tk = groups, kr.shape[1]
    Tq = TG // G
    acc = out.dtype
    kv_heads = 1 if mask is None else BK // mask.shape[0]
    offset = Tk - Tq
    kf, vf = kr.to(acc), vr.to(acc)  # no copy for float32 inputs
    for i0, i1, tiles in tile_plan(Tq, Tk, bq, bk, causal):
        r0, r1 = i0 * G, i1 * G
        qt = qr[:, r0:r1].to(acc) * (scale * _LOG2E)  # (BK, R, D) pre-scaled: scores come out in base 2
        o = out[:, r0:r1]  # (BK, R, D) view: the accumulator of this query tile
        m = lse[:, r0:r1] * _LOG2E  # (BK, R) running max, base 2
        l = (~torch.isneginf(m)).to(acc)  # (BK, R) running denominator: 1 for a partial result, 0 for none
        for j0, j1, diag in tiles:
            skip, pad = _key_tile_padding(mask, j0, j1, kv_heads)
            if skip:
                continue
            s = _masked_scores(qt, kf[:, j0:j1], diag=diag, pad=pad, i0=i0, i1=i1, j0=j0, offset=offset, groups=G)
            m_new = torch.maximum(m, s.amax(dim=-1))  # (BK, R)
            m_safe = m_new.masked_fill(torch.isneginf(m_new), 0.0)  # rows with no key so far: 2^(-inf - 0) = 0
            alpha = torch.exp2(m - m_safe)  # (BK, R) rescale of what was accumulated before
            p = s.sub_(m_safe[..., None]).exp2_()  # (BK, R, bk), in place: the scores are not needed again
            l = l * alpha + p.sum(dim=-1)
            o.mul_(alpha[..., None]).baddbmm_(p, vf[:, j0:j1])  # acc' = alpha * acc + p @ v: (BK, R, D)
            m = m_new
            del s, p  # free this tile before the next one is computed
        empty = l == 0  # rows that saw no key: zeros and lse = -inf
        o.div_(l.masked_fill(empty, 1.0)[..., None])
        lse[:, r0:r1] = ((m + torch.log2(l)) * _LN2).masked_fill(empty, _NEG_INF)  # back to base e


def backward_rows(
    qr: Tensor, kr: Tensor, vr: Tensor, outr: Tensor, lser: Tensor, dor: Tensor, dlser: Tensor | None,
    mask: Tensor | None, groups: int, causal: bool, scale: float, bq: int, bk: int,
    dq: Tensor, dk: Tensor, dv: Tensor,
) -> None:
    """FlashAttention-2 backward in row layout, *accumulating* into dq (BK, Tq*G, D) and dk, dv (BK, Tk, D).

    Inputs as in ``forward_rows``; outr, lser, dor, dlser are the (global) output, its lse (base e), the
    gradient of the output and of the lse, in rows. Each tile's probabilities are recomputed from the lse.
    Allocates only per tile, plus float32 copies of K/V if they are not float32.
    """
    BK, TG, D = qr.shape
    G, Tk = groups, kr.shape[1]
    Tq = TG // G
    acc = dq.dtype
    kv_heads = 1 if mask is None else BK // mask.shape[0]
    offset = Tk - Tq
    kf, vf = kr.to(acc), vr.to(acc)  # (BK, Tk, D); no copy for float32 inputs
    for i0, i1, tiles in tile_plan(Tq, Tk, bq, bk, causal):
        r0, r1 = i0 * G, i1 * G
        qt = qr[:, r0:r1].to(acc) * (scale * _LOG2E)  # (BK, R, D) pre-scaled: scores in base 2
        dot, dqt = dor[:, r0:r1].to(acc), dq[:, r0:r1]  # (BK, R, D)
        deltat = (dot * outr[:, r0:r1].to(acc)).sum(dim=-1, keepdim=True)  # (BK, R, 1): rowsum(dO * O)
        if dlser is not None:
            deltat = deltat - dlser[:, r0:r1, None].to(acc)  # d lse / d s = p: dlse enters as -Delta
        lt = lser[:, r0:r1, None].to(acc) * _LOG2E  # (BK, R, 1) in base 2
        lt = lt.masked_fill(torch.isneginf(lt), float("inf"))  # empty rows: p = 2^(s - inf) = 0
        for j0, j1, diag in tiles:
            skip, pad = _key_tile_padding(mask, j0, j1, kv_heads)
            if skip:
                continue
            kt, vt = kf[:, j0:j1], vf[:, j0:j1]  # (BK, bk, D)
            s = _masked_scores(qt, kt, diag=diag, pad=pad, i0=i0, i1=i1, j0=j0, offset=offset, groups=G)
            p = s.sub_(lt).exp2_()  # (BK, R, bk) the forward's probabilities, recomputed
            dv[:, j0:j1].baddbmm_(p.transpose(1, 2), dot)  # dV += P^T dO: (BK, bk, D), summed over the group
            ds = torch.bmm(dot, vt.transpose(1, 2))  # dP = dO V^T: (BK, R, bk)
            ds.sub_(deltat).mul_(p)  # dS = P * (dP - Delta)
            # s = scale * q k^T while qt = q * scale * log2(e): dQ = scale * dS K, dK = scale * dS^T Q = ln 2 * dS^T qt
            dqt.baddbmm_(ds, kt, alpha=scale)  # (BK, R, D)
            dk[:, j0:j1].baddbmm_(ds.transpose(1, 2), qt, alpha=_LN2)  # (BK, bk, D)
            del s, p, ds  # free this tile before the next one is computed
