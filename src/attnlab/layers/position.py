"""Position information, chosen by ``ModelConfig.position``.

- ``learned``: a trained table added to the token embeddings (GPT-2, BERT).
- ``sinusoidal``: the fixed sin/cos table of Vaswani et al. 2017, added to the embeddings.
- ``rope``: rotary embeddings (Su et al. 2021) applied to queries and keys inside attention, in the
  "rotate half" layout Llama checkpoints use.
- ``none``: no positions (a causal decoder can still infer them; an encoder cannot).

Shape legend: B batch, T time, H heads, D head dim, C d_model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(positions: Tensor, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, T) integer positions -> (B, T, dim) sin/cos features (computed in float32 or float64)."""
    acc = torch.promote_types(dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=acc) / half)
    angles = positions.to(acc)[..., None] * freqs  # (B, T, half)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        table = torch.nn.functional.pad(table, (0, 1))
    return table.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin of position x inverse frequency, computed per call from the position ids.

    Angles are computed in float32 (float64 for a float64 model), as Llama checkpoints expect, and only
    then cast: a bf16 model still gets accurate angles. The frequencies are not a buffer, so casting
    the model never rounds them.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(B, T) positions -> cos, sin of shape (B, 1, T, D) ready to broadcast over heads."""
        if dtype == torch.float64:
            inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        else:
            inv = self.inv_freq
        angles = positions[..., None].to(inv.dtype) * inv.to(positions.device)  # (B, T, D/2)
        emb = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) queries or keys by their positions' angles."""
    return x * cos + rotate_half(x) * sin
