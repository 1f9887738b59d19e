"""Ring attention (Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite
Context") over ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

The sequence is sharded over the P ranks of a process group. Each rank keeps its queries and passes its
K/V shard around the ring: at step s it computes its queries against the block that started on rank
r - s (the FlashAttention tile engine, ``tiles.forward_rows``) while the next block travels, continuing
the online softmax of its (out, lse) in place (the log-sum-exp identity of ``merge_partials``). After P
steps every query has seen every key, exactly. Backward runs the ring again: each rank recomputes its blocks
(``tiles.backward_rows`` with the *global* output and lse), accumulates dQ in place, and the dK/dV
accumulators travel with their block, arriving home after a full turn.

Memory: the (batch, K/V head) pairs go round the ring in ``head_groups`` groups, one group after another
(attention is independent per head), so what is in flight — the block being computed on, the one being
received and the travelling dK/dV — is 1/head_groups of a shard. Receive buffers are reused (ping-pong)
and nothing of shard size is copied; per rank the peak is about out + dQ + dK + dV + 8/head_groups
local-size tensors (docs/ring.md derives the bound).

Causal load balancing: with a contiguous layout (rank r holds chunk r of P) rank 0 has almost nothing to
compute and rank P-1 everything. The zigzag layout (rank r holds chunks r and 2P-1-r of 2P) gives every
rank the same amount of unmasked work. ``shard``/``unshard`` convert between a full sequence and a
rank's shard for either layout.

Shape legend: B batch, H query heads, K kv heads, G = H // K, Tl local tokens (= T / P), D head dim, P ranks,
n (batch, kv head) pairs in a head group.
"""

from __future__ import annotations

import math
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from attnlab.attention.tiles import backward_rows, default_block_sizes, flat_rows, forward_rows, from_rows

LAYOUTS = ("contiguous", "zigzag")


# ----------------------------------------------------------------------------- layouts
def chunk_ids(rank: int, world: int, layout: str) -> list[int]:
    """Which chunks of the sequence a rank holds (P chunks contiguous, 2P chunks zigzag)."""
    if layout == "contiguous":
        return [rank]
    if layout == "zigzag":
        return [rank, 2 * world - 1 - rank]
    raise ValueError(f"layout={layout!r} is not valid; choose one of {LAYOUTS}")


def shard(x: Tensor, rank: int, world: int, *, layout: str = "zigzag", dim: int = 1) -> Tensor:
    """This rank's shard of a full sequence ``x`` (sequence along ``dim``)."""
    n_chunks = world * (2 if layout == "zigzag" else 1)
    if x.shape[dim] % n_chunks:
        raise ValueError(f"sequence length {x.shape[dim]} must be divisible by {n_chunks} for the {layout} "
                         f"layout on {world} ranks; pad the sequence")
    chunks = x.chunk(n_chunks, dim=dim)
    return torch.cat([chunks[i] for i in chunk_ids(rank, world, layout)], dim=dim)


def unshard(parts: list[Tensor], *, layout: str = "zigzag", dim: int = 1) -> Tensor:
    """Reassemble the full sequence from every rank's shard (in rank order)."""
    world = len(parts)
    chunks: dict[int, Tensor] = {}
    for rank, part in enumerate(parts):
        ids = chunk_ids(rank, world, layout)
        for cid, piece in zip(ids, part.chunk(len(ids), dim=dim)):
            chunks[cid] = piece
    return torch.cat([chunks[i] for i in sorted(chunks)], dim=dim)


def shard_positions(total: int, rank: int, world: int, *, layout: str = "zigzag") -> Tensor:
    """Global position ids (Tl,) of this rank's tokens (for RoPE / learned positions)."""
    return shard(torch.arange(total)[None], rank, world, layout=layout, dim=1)[0]


# ----------------------------------------------------------------------------- block plan
def block_pairs(q_rank: int, kv_rank: int, world: int, layout: str, causal: bool, tl: int) -> list[tuple[slice, slice, bool]]:
    """(query rows, key rows, causal-diagonal) sub-blocks this rank computes against one K/V block.

    A sub-block whose query chunk comes after the key chunk is computed in full; the same chunk is the
    causal diagonal; a query chunk before the key chunk is skipped (fully masked).
    """
    q_ids, k_ids = chunk_ids(q_rank, world, layout), chunk_ids(kv_rank, world, layout)
    c = tl // len(q_ids)
    pairs = []
    for a, qa in enumerate(q_ids):
        for b, kb in enumerate(k_ids):
            if causal and qa < kb:
                continue
            pairs.append((slice(a * c, (a + 1) * c), slice(b * c, (b + 1) * c), causal and qa == kb))
    return pairs


def head_groups_of(batch: int, kv_heads: int, groups: int) -> list[tuple[slice, slice]]:
    """Split the (batch, kv head) pairs into about ``groups`` groups: (batch slice, kv-head slice) each.

    Up to ``batch`` groups take whole batch elements; more split each batch element over its K/V heads.
    Every group is a contiguous slice of a contiguous (B, K, ...) tensor, so it can be sent without a copy.
    """
    groups = max(1, min(groups, batch * kv_heads))
    if groups <= batch:
        edges = [round(i * batch / groups) for i in range(groups + 1)]
        return [(slice(a, b), slice(0, kv_heads)) for a, b in zip(edges, edges[1:])]
    per_batch = min(kv_heads, math.ceil(groups / batch))
    edges = [round(i * kv_heads / per_batch) for i in range(per_batch + 1)]
    return [(slice(b, b + 1), slice(a, c)) for b in range(batch) for a, c in zip(edges, edges[1:])]


def default_head_groups(k: Tensor) -> int:
    """Groups for a K shard: up to 8 (then the buffers in flight hold about one K-sized tensor), each group's
    K block at least 256 KiB (short sequences go round in one piece: fewer, larger messages and calls)."""
    return max(1, min(8, k.numel() * k.element_size() // 2**18))


# ----------------------------------------------------------------------------- communication
class _Ring:
    """Point-to-point exchange with the ring neighbours, asynchronous so it overlaps computation."""

    def __init__(self, group, timeout: float | None) -> None:
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.send_to = dist.get_global_rank(group, (self.rank + 1) % self.world) if group is not None else (self.rank + 1) % self.world
        self.recv_from = dist.get_global_rank(group, (self.rank - 1) % self.world) if group is not None else (self.rank - 1) % self.world
        self.timeout = timeout

    def start(self, send: list[Tensor], recv: list[Tensor], tag: int = 0) -> list:
        """Send ``send`` to the next rank and receive the previous rank's into ``recv`` (same shapes), asynchronously."""
        # one tag per tensor: concurrent messages between the same two ranks must not be matched out of order
        ops = [dist.P2POp(dist.isend, t, self.send_to, self.group, tag=tag + i) for i, t in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, b, self.recv_from, self.group, tag=tag + i) for i, b in enumerate(recv)]
        return dist.batch_isend_irecv(ops)

    def gather_masks(self, mask: Tensor | None) -> Tensor | None:
        """(P, B, Tl) bool: every rank's key padding mask (tiny next to K/V, so it is gathered once, not sent round)."""
        if mask is None:
            return None
        if self.world == 1:
            return mask.bool()[None]
        everyone = [torch.empty_like(mask) for _ in range(self.world)]
        dist.all_gather(everyone, mask.contiguous(), group=self.group)
        return torch.stack(everyone).bool()

    def wait(self, reqs: list) -> None:
        try:
            for req in reqs:
                if self.timeout is not None:
                    req.wait(timedelta(seconds=self.timeout))
                else:
                    req.wait()
        except RuntimeError as exc:
            raise RuntimeError(
                f"ring attention on rank {self.rank}: no answer from rank {self.recv_from} or {self.send_to} "
                f"within the timeout ({self.timeout or 'the process group default'} s). A peer process died "
                f"or the ranks disagree on the shapes. ({str(exc).splitlines()[0]})"
            ) from None


def _check_same_shapes(q: Tensor, k: Tensor, mask: Tensor | None, head_groups: int, group, layout: str) -> None:
    """All ranks must hold shards of the same shape (a clear error instead of a hang or garbage)."""
    world = dist.get_world_size(group)
    mine = torch.tensor(list(q.shape) + list(k.shape) + [int(mask is not None), head_groups], dtype=torch.long)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    try:
        dist.all_gather(everyone, mine, group=group)
    except RuntimeError as exc:
        raise RuntimeError(
            f"ring attention on rank {dist.get_rank(group)}: a peer did not answer the shape check (it died, or "
            f"never called ring attention) within the process group's timeout. ({str(exc).splitlines()[0][:200]})"
        ) from None
    for rank, shape in enumerate(everyone):
        if not torch.equal(shape, mine):
            raise ValueError(f"ring attention: rank {rank} holds q/k shards, has a padding mask, uses head "
                             f"groups {shape.tolist()}, this rank {mine.tolist()}; every rank needs a shard of the same "
                             f"length (shard() helps), all or none a key padding mask, and the same head_groups")
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"the zigzag layout needs an even local length (two chunks), got {q.shape[2]}")


def _result_rows(full: Tensor, bs: slice, hs: slice, n: int, groups: int, fill: float) -> Tensor:
    """Where a head group's (n, Tl*G, ...) result accumulates: a view of ``full`` (B, H, Tl, ...) when G = 1,
    else a new row buffer (``_put_rows`` writes it back); ``fill`` is its initial value."""
    if groups == 1:
        return full[bs, hs].view(n, *full.shape[2:])
    rows_shape = (n, full.shape[2] * groups, *full.shape[3:])
    return torch.full(rows_shape, fill, dtype=full.dtype, device=full.device)


def _put_rows(full: Tensor, rows: Tensor, bs: slice, hs: slice, groups: int) -> None:
    if groups > 1:
        nb = bs.stop - bs.start
        full[bs, hs] = from_rows(rows.view(nb, rows.shape[0] // nb, *rows.shape[1:]), groups)


def _kv_rows(x: Tensor, bs: slice, ks: slice) -> Tensor:
    """(n, Tl, D) contiguous block of a head group's keys or values (a view for contiguous x)."""
    return x[bs, ks].reshape(-1, *x.shape[2:]).contiguous()


def _forward_group(ring: _Ring, qr: Tensor, kv: list[Tensor], masks: Tensor | None, groups: int, layout: str,
                   causal: bool, scale: float, bq: int, bk: int, out: Tensor, lse: Tensor) -> None:
    """One head group round the ring: out (n, Tl*G, D) and lse (n, Tl*G) accumulate in place.

    kv: this rank's [K, V] of the group, (n, Tl, D) contiguous; masks (P, nb, Tl) or None. While the block of
    step s is computed on, it is sent on and the block of step s + 1 received into the buffer that held
    step s - 1 (ping-pong: two buffers per tensor, allocated once).
    """
    Tl = kv[0].shape[1]
    spare = None  # a received block that has been passed on: the next receive buffer
    for step in range(ring.world):
        src = (ring.rank - step) % ring.world
        if step < ring.world - 1:  # the block travels on while this rank computes on it
            recv = spare if spare is not None else [torch.empty_like(t) for t in kv]
            reqs = ring.start(kv, recv)
        mb = None if masks is None else masks[src]  # (nb, Tl)
        for rows, cols, diag in block_pairs(ring.rank, src, ring.world, layout, causal, Tl):
            r = slice(rows.start * groups, rows.stop * groups)
            forward_rows(qr[:, r], kv[0][:, cols], kv[1][:, cols], None if mb is None else mb[:, cols], groups,
                         diag, scale, bq, bk, out[:, r], lse[:, r])
        if step < ring.world - 1:
            ring.wait(reqs)
            spare = kv if step > 0 else None  # step 0 sent this rank's own K/V: not ours to overwrite
            kv = recv


def _backward_group(ring: _Ring, qr: Tensor, kv: list[Tensor], outr: Tensor, lser: Tensor, dor: Tensor,
                    masks: Tensor | None, groups: int, layout: str, causal: bool, scale: float, bq: int, bk: int,
                    dq: Tensor, dkv: list[Tensor]) -> None:
    """One head group round the ring backward: dq (n, Tl*G, D) accumulates in place; dkv, this rank's (n, Tl, D)
    dK and dV slices (zeros on entry), receive its gradients.

    K/V travel as in the forward (overlapping the computation); the dK/dV accumulated for a block travel
    with it once this rank has added its share, so after P hops each rank's own are home. The output slices
    are one of the two dK/dV ping-pong buffers: the block of step 0 accumulates in them.
    """
    Tl = kv[0].shape[1]
    grads = list(dkv)  # dK, dV of the block being computed on
    kv_spare = grad_spare = None  # ping-pong receive buffers
    for step in range(ring.world):
        src = (ring.rank - step) % ring.world
        reqs = []
        if step < ring.world - 1:  # K/V travel on while this rank computes
            kv_recv = kv_spare if kv_spare is not None else [torch.empty_like(t) for t in kv]
            reqs += ring.start(kv, kv_recv)
        mb = None if masks is None else masks[src]
        for rows, cols, diag in block_pairs(ring.rank, src, ring.world, layout, causal, Tl):
            r = slice(rows.start * groups, rows.stop * groups)
            backward_rows(qr[:, r], kv[0][:, cols], kv[1][:, cols], outr[:, r], lser[:, r], dor[:, r], None,
                          None if mb is None else mb[:, cols], groups, diag, scale, bq, bk,
                          dq[:, r], grads[0][:, cols], grads[1][:, cols])
        if ring.world > 1:  # dK/dV move on with their block
            grad_recv = grad_spare if grad_spare is not None else [torch.empty_like(t) for t in grads]
            reqs += ring.start(grads, grad_recv, tag=2)
            ring.wait(reqs)
            grad_spare, grads = grads, grad_recv
        if step < ring.world - 1:
            kv_spare = kv if step > 0 else None
            kv = kv_recv
    for dst, g in zip(dkv, grads):
        if g is not dst:  # an odd number of hops left them in the other buffer
            dst.copy_(g)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, layout, group, timeout, head_groups):  # type: ignore[override]
        ring = _Ring(group, timeout)
        B, H, Tl, D = q.shape
        K = k.shape[1]
        G = H // K
        acc = torch.promote_types(q.dtype, torch.float32)
        masks = ring.gather_masks(mask)  # (P, B, Tl) or None
        sub = Tl // len(chunk_ids(0, ring.world, layout))
        bq, bk = default_block_sizes(sub, sub, G)
        out = torch.zeros(B, H, Tl, D, dtype=acc, device=q.device)
        lse = torch.full((B, H, Tl), float("-inf"), dtype=acc, device=q.device)
        for bs, ks in head_groups_of(B, K, head_groups):
            hs = slice(ks.start * G, ks.stop * G)
            qr = flat_rows(q[bs, hs], ks.stop - ks.start)  # (n, Tl*G, D)
            o, l = _result_rows(out, bs, hs, qr.shape[0], G, 0.0), _result_rows(lse, bs, hs, qr.shape[0], G, -math.inf)
            _forward_group(ring, qr, [_kv_rows(k, bs, ks), _kv_rows(v, bs, ks)], None if masks is None else masks[:, bs],
                           G, layout, causal, scale, bq, bk, o, l)
            _put_rows(out, o, bs, hs, G)
            _put_rows(lse, l, bs, hs, G)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, masks)
        ctx.causal, ctx.scale, ctx.layout, ctx.group, ctx.timeout = causal, scale, layout, group, timeout
        ctx.head_groups = head_groups
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse, masks = ctx.saved_tensors
        ring = _Ring(ctx.group, ctx.timeout)
        B, H, Tl, D = q.shape
        K = k.shape[1]
        G = H // K
        acc = torch.promote_types(q.dtype, torch.float32)
        sub = Tl // len(chunk_ids(0, ring.world, ctx.layout))
        bq, bk = default_block_sizes(sub, sub, G)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk, dv = torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)
        for bs, ks in head_groups_of(B, K, ctx.head_groups):
            hs, nk = slice(ks.start * G, ks.stop * G), ks.stop - ks.start
            qr, outr, lser, dor = (flat_rows(t[bs, hs], nk) for t in (q, out, lse, dout))  # (n, Tl*G, ...)
            dqr = _result_rows(dq, bs, hs, qr.shape[0], G, 0.0)
            _backward_group(ring, qr, [_kv_rows(k, bs, ks), _kv_rows(v, bs, ks)], outr, lser, dor,
                            None if masks is None else masks[:, bs], G, ctx.layout, ctx.causal, ctx.scale, bq, bk,
                            dqr, [dk[bs, ks].view(-1, Tl, D), dv[bs, ks].view(-1, Tl, D)])
            _put_rows(dq, dqr, bs, hs, G)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group=None,
    causal: bool = False,
    layout: str = "zigzag",
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    timeout: float | None = None,
    head_groups: int | None = None,
) -> Tensor:
    """Exact attention over a sequence sharded across the ranks of ``group`` (default: the world).

    q (B, H, Tl, D), k/v (B, K, Tl, D): this rank's shard in ``layout`` (see ``shard``);
    key_padding_mask (B, Tl) bool for this shard's keys. Returns this rank's (B, H, Tl, D) output.
    ``timeout`` (seconds) bounds each exchange: a dead peer gives an error instead of a hang.
    ``head_groups``: the (batch, K/V head) pairs go round the ring in this many groups, one after another;
    more groups hold less in flight (about 8 / head_groups K-sized tensors) at the cost of more, smaller
    messages and kernel calls. Default ``default_head_groups(k)``: up to 8, each group's K at least 256 KiB.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("ring attention needs torch.distributed initialised (e.g. launch with torchrun and "
                         "call torch.distributed.init_process_group('gloo'))")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not valid; choose one of {LAYOUTS}")
    if q.dim() != 4 or k.shape != v.shape or q.shape[1] % k.shape[1]:
        raise ValueError(f"ring attention needs q (B, H, Tl, D) and k, v (B, K, Tl, D) with H a multiple of K; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError("ring attention shards queries and keys alike: q and k need the same local length")
    if head_groups is not None and (not isinstance(head_groups, int) or head_groups < 1):
        raise ValueError(f"head_groups must be a positive int or None; got {head_groups!r}")
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.uint8)  # gloo sends no bools
    groups = default_head_groups(k) if head_groups is None else head_groups
    _check_same_shapes(q, k, mask, groups, group, layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, mask, causal, scale, layout, group, timeout, groups)


def ring_kernel(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, mask: Tensor | None = None,
                scale: float | None = None, layout: str = "zigzag") -> tuple[Tensor, None]:
    """The registry's kernel signature (``attention_kernel="ring"``); needs an initialised process group."""
    if q.shape[2] != k.shape[2]:
        raise ValueError("attention_kernel='ring' runs on sequence shards (training / prefill); decode with a "
                         "cache on one process with another kernel")
    return ring_attention(q, k, v, causal=causal, layout=layout, key_padding_mask=mask, scale=scale), None
