"""Normalisation layers, chosen by ``ModelConfig.norm``.

Every norm takes ``(x, mask=None)``; ``mask`` (B, T) marks real tokens (True) among padding. LayerNorm
and RMSNorm work per token and ignore it; the sequence BatchNorm needs it.

Shape legend: B batch, T time, C channels (d_model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm(nn.Module):
    """LayerNorm over the channel dimension (Ba et al. 2016): per token, so padding never leaks in."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # (B, T, C) -> (B, T, C)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), as Llama uses it: computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # (B, T, C) -> (B, T, C)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 at least, as Llama
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SequenceBatchNorm(nn.Module):
    """BatchNorm (Ioffe & Szegedy 2015) for (B, T, C) sequences: per-channel statistics over batch *and* time.

    Why it struggles with text: its statistics are shared by every token of the batch, so a token's output
    depends on the *other* sequences and on how much padding the batch carries; sequence lengths vary, so
    the statistics of a batch are noisy and differ between training (batch statistics) and evaluation
    (running averages); with small or very unequal batches the gap grows; and in a causal LM the batch
    statistics include future tokens. LayerNorm normalises each token on its own and has none of these
    problems, which is why Transformers use it.

    ``masked=True`` (``norm="batch"``) computes mean and variance over real tokens only, so appending
    padding does not change the outputs of real tokens. ``masked=False`` (``norm="batch_naive"``) counts
    padding in the statistics, as a plain ``nn.BatchNorm1d`` would: the failure the field guide describes.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1, masked: bool = True) -> None:
        super().__init__()
        self.eps, self.momentum, self.masked = eps, momentum, masked
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # (B, T, C) -> (B, T, C)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.training:
            if self.masked and mask is not None:
                w = mask.to(xf.dtype)[..., None]  # (B, T, 1): 1 for real tokens
                n = w.sum().clamp_min(1.0)
                mean = (xf * w).sum(dim=(0, 1)) / n  # (C,)
                var = (((xf - mean) ** 2) * w).sum(dim=(0, 1)) / n
            else:
                n = torch.tensor(float(xf.shape[0] * xf.shape[1]))
                mean = xf.mean(dim=(0, 1))
                var = xf.var(dim=(0, 1), unbiased=False)
            with torch.no_grad():
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean.to(xf.dtype), self.running_var.to(xf.dtype)
        y = (xf - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        return y.to(x.dtype)


def build_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    if kind == "layer":
        return LayerNorm(dim, eps, bias)
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind in ("batch", "batch_naive"):
        return SequenceBatchNorm(dim, eps, masked=kind == "batch")
    raise ValueError(f"norm={kind!r} is not valid; choose 'layer', 'rms', 'batch' or 'batch_naive'")
