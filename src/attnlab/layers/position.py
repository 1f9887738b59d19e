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


def sinusoidal_table(positions: Tensor, dim: int) -> Tensor:
    """(B, T) integer positions -> (B, T, dim) float32 sin/cos features."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[..., None] * freqs  # (B, T, half)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        table = torch.nn.functional.pad(table, (0, 1))
    return table


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for positions [0, max_seq_len), looked up by position id."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, D/2)
        emb = torch.cat([angles, angles], dim=-1)  # (T, D)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(B, T) positions -> cos, sin of shape (B, 1, T, D) ready to broadcast over heads."""
        return self.cos[positions][:, None].to(dtype), self.sin[positions][:, None].to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) queries or keys by their positions' angles."""
    return x * cos + rotate_half(x) * sin
