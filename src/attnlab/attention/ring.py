"""Ring attention (Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite
Context") over ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

The sequence is sharded over the P ranks of a process group. Each rank keeps its queries and passes its
K/V shard around the ring: at step s it computes its queries against the block that started on rank
r - s (a FlashAttention block, ``flash._forward``) while the next block travels, and merges the partial
results by log-sum-exp (``merge_partials``). After P steps every query has seen every key, exactly.
Backward runs the ring again: each rank recomputes its blocks (``flash._backward`` with the *global*
output and lse), keeps dQ, and sends dK/dV along with the block, so they arrive home after a full turn.

Causal load balancing: with a contiguous layout (rank r holds chunk r of P) rank 0 has almost nothing to
compute and rank P-1 everything. The zigzag layout (rank r holds chunks r and 2P-1-r of 2P) gives every
rank the same amount of unmasked work. ``shard``/``unshard`` convert between a full sequence and a
rank's shard for either layout.

Shape legend: B batch, H query heads, K kv heads, Tl local tokens (= T / P), D head dim, P ranks.
"""

from __future__ import annotations

import math
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from attnlab.attention.flash import _backward, _forward, default_block_sizes
from attnlab.attention.merge import merge_partials

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


# ----------------------------------------------------------------------------- communication
class _Ring:
    """Point-to-point exchange with the ring neighbours, asynchronous so it overlaps computation."""

    def __init__(self, group, timeout: float | None) -> None:
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.send_to = dist.get_global_rank(group, (self.rank + 1) % self.world) if group is not None else (self.rank + 1) % self.world
        self.recv_from = dist.get_global_rank(group, (self.rank - 1) % self.world) if group is not None else (self.rank - 1) % self.world
        self.timeout = timeout

    def start(self, tensors: list[Tensor]) -> tuple[list, list[Tensor]]:
        tensors = [t.contiguous() for t in tensors]
        bufs = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        # one tag per tensor: concurrent messages between the same two ranks must not be matched out of order
        ops = [dist.P2POp(dist.isend, t, self.send_to, self.group, tag=i) for i, t in enumerate(tensors)]
        ops += [dist.P2POp(dist.irecv, b, self.recv_from, self.group, tag=i) for i, b in enumerate(bufs)]
        return dist.batch_isend_irecv(ops), bufs

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


def _check_same_shapes(q: Tensor, k: Tensor, group, layout: str) -> None:
    """All ranks must hold shards of the same shape (a clear error instead of a hang or garbage)."""
    world = dist.get_world_size(group)
    mine = torch.tensor(list(q.shape) + list(k.shape), dtype=torch.long)
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
            raise ValueError(f"ring attention: rank {rank} holds q/k shards {shape.tolist()}, this rank "
                             f"{mine.tolist()}; every rank needs a shard of the same length (shard() helps)")
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"the zigzag layout needs an even local length (two chunks), got {q.shape[2]}")


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, layout, group, timeout):  # type: ignore[override]
        ring = _Ring(group, timeout)
        B, H, Tl, D = q.shape
        bq, bk = default_block_sizes(Tl, Tl, H // k.shape[1])
        out = torch.zeros(B, H, Tl, D, dtype=torch.promote_types(q.dtype, torch.float32))
        lse = torch.full((B, H, Tl), float("-inf"), dtype=out.dtype)
        block = [k, v] + ([mask] if mask is not None else [])
        for step in range(ring.world):
            src = (ring.rank - step) % ring.world
            reqs, nxt = ring.start(block) if step < ring.world - 1 else ([], None)
            kb, vb = block[0], block[1]
            mb = block[2].bool() if mask is not None else None
            for rows, cols, diag in block_pairs(ring.rank, src, ring.world, layout, causal, Tl):
                o, l = _forward(q[:, :, rows], kb[:, :, cols], vb[:, :, cols], None if mb is None else mb[:, cols],
                                diag, scale, bq, bk)
                out[:, :, rows], lse[:, :, rows] = merge_partials(out[:, :, rows], lse[:, :, rows], o.to(out.dtype), l)
            ring.wait(reqs)
            if nxt is not None:
                block = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale, ctx.layout, ctx.group, ctx.timeout = causal, scale, layout, group, timeout
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse, mask = ctx.saved_tensors
        ring = _Ring(ctx.group, ctx.timeout)
        Tl = q.shape[2]
        bq, bk = default_block_sizes(Tl, Tl, q.shape[1] // k.shape[1])
        acc = torch.promote_types(q.dtype, torch.float32)
        dq = torch.zeros(q.shape, dtype=acc)
        dk, dv = torch.zeros(k.shape, dtype=acc), torch.zeros(v.shape, dtype=acc)
        block = [k, v] + ([mask] if mask is not None else [])
        for step in range(ring.world):
            src = (ring.rank - step) % ring.world
            kb, vb = block[0], block[1]
            mb = block[2].bool() if mask is not None else None
            for rows, cols, diag in block_pairs(ring.rank, src, ring.world, ctx.layout, ctx.causal, Tl):
                g_q, g_k, g_v = _backward(q[:, :, rows], kb[:, :, cols], vb[:, :, cols], out[:, :, rows],
                                          lse[:, :, rows], dout[:, :, rows], None,
                                          None if mb is None else mb[:, cols], diag, ctx.scale, bq, bk)
                dq[:, :, rows] += g_q
                dk[:, :, cols] += g_k
                dv[:, :, cols] += g_v
            if ring.world == 1:  # one process: the block never leaves home
                break
            # the block moves on, carrying the dK/dV accumulated for it; after a full turn it is home
            reqs, nxt = ring.start(block + [dk, dv])
            ring.wait(reqs)
            block, dk, dv = nxt[:-2], nxt[-2], nxt[-1]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


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
) -> Tensor:
    """Exact attention over a sequence sharded across the ranks of ``group`` (default: the world).

    q (B, H, Tl, D), k/v (B, K, Tl, D): this rank's shard in ``layout`` (see ``shard``);
    key_padding_mask (B, Tl) bool for this shard's keys. Returns this rank's (B, H, Tl, D) output.
    ``timeout`` (seconds) bounds each exchange: a dead peer gives an error instead of a hang.
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
    _check_same_shapes(q, k, group, layout)
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.uint8)  # gloo sends no bools
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, mask, causal, scale, layout, group, timeout)


def ring_kernel(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, mask: Tensor | None = None,
                scale: float | None = None, layout: str = "zigzag") -> tuple[Tensor, None]:
    """The registry's kernel signature (``attention_kernel="ring"``); needs an initialised process group."""
    if q.shape[2] != k.shape[2]:
        raise ValueError("attention_kernel='ring' runs on sequence shards (training / prefill); decode with a "
                         "cache on one process with another kernel")
    return ring_attention(q, k, v, causal=causal, layout=layout, key_padding_mask=mask, scale=scale), None
