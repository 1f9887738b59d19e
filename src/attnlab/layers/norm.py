"""Normalisation layers, chosen by ``ModelConfig.norm``.

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

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), as Llama uses it: computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 at least, as Llama
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def build_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    if kind == "layer":
        return LayerNorm(dim, eps, bias)
    if kind == "rms":
        return RMSNorm(dim, eps)
    raise ValueError(f"norm={kind!r} is not valid; choose 'layer' or 'rms'")
