"""Processes under torchrun: data parallel (DDP) and context parallel (ring attention) groups.

With ``WORLD_SIZE`` = N processes and ``--context-parallel P`` (P divides N), ranks form N / P context
groups of P consecutive ranks. The ranks of a context group read the *same* batch, each keeps its zigzag
shard of every sequence (``attention_kernel="ring"`` makes attention exact across them), and their
gradients are summed; the N / P groups are data-parallel replicas averaged by DDP. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class ContextParallel:
    group: object
    size: int
    rank: int

    def shard_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        from attnlab.attention.ring import shard, shard_positions

        T = x.shape[1]
        if T % (2 * self.size):
            raise ValueError(f"--seq-len {T} must be divisible by 2 x --context-parallel ({2 * self.size})")
        return (shard(x, self.rank, self.size), shard(y, self.rank, self.size),
                shard_positions(T, self.rank, self.size).to(x.device))


class DistContext:
    def __init__(self, world: int = 1, rank: int = 0, cp: ContextParallel | None = None, dp_group=None) -> None:
        self.world, self.rank, self.cp, self.dp_group = world, rank, cp, dp_group
        cp_size = cp.size if cp else 1
        self.data_world = world // cp_size
        self.data_rank = rank // cp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls) -> DistContext:
        return cls()

    @classmethod
    def from_env(cls, context_parallel: int = 1) -> DistContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            if context_parallel > 1:
                raise ValueError(f"--context-parallel {context_parallel} needs that many processes: launch with "
                                 f"torchrun --nproc-per-node {context_parallel} -m attnlab train ...")
            return cls.single()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
        if world % context_parallel:
            raise ValueError(f"--context-parallel {context_parallel} must divide the number of processes ({world})")
        cp = dp_group = None
        for g in range(world // context_parallel):  # every rank creates every group (a collective)
            ranks = list(range(g * context_parallel, (g + 1) * context_parallel))
            group = dist.new_group(ranks)
            if rank in ranks and context_parallel > 1:
                cp = ContextParallel(group, context_parallel, ranks.index(rank))
        for c in range(context_parallel):
            ranks = list(range(c, world, context_parallel))
            group = dist.new_group(ranks)
            if rank in ranks:
                dp_group = group
        return cls(world, rank, cp, dp_group)

    def close(self) -> None:
        """Wait for every rank, then tear the process group down.

        Leaving gloo's threads alive at interpreter exit can abort a rank ("terminate called without an
        active exception") after its work is done; every process that ran a collective should call this.
        """
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.data_world > 1:
            return nn.parallel.DistributedDataParallel(model, process_group=self.dp_group)
        return model

    def gather_tensor(self, t: Tensor) -> list[Tensor]:
        if self.world == 1:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous())
        return out

    def any_flag(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def cp_sum(self, t: Tensor) -> Tensor:
        if self.cp is None:
            return t
        t = t.clone()
        dist.all_reduce(t, group=self.cp.group)
        return t

    def mean_over_data(self, value: float) -> float:
        """The mean of a per-replica scalar (e.g. the loss) over the data-parallel replicas."""
        if self.data_world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, group=self.dp_group)
        return float(t.item()) / self.data_world

    def reduce_context_parallel_grads(self, model: nn.Module) -> None:
        """Each rank's loss covers its shard only: the full gradient is the sum over the context group."""
        if self.cp is None:
            return
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.cp.group)
