"""Position-wise feed-forward networks, chosen by ``ModelConfig.ffn``.

Two linear layers with an activation between them (relu, gelu, gelu_tanh as GPT-2, silu as Marian), or the gated
SwiGLU variant (Shazeer 2020) with a third, gating projection as Llama uses it.
Shape legend: B batch, T time, C d_model, F d_ff.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.config import ModelConfig


class FFN(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.ffn
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.ffn_bias)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.ffn_bias) if cfg.ffn == "swiglu" else None
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.ffn_bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        if self.kind == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)  # (B, T, F)
        elif self.kind == "relu":
            h = F.relu(self.up(x))
        elif self.kind == "gelu":
            h = F.gelu(self.up(x))
        elif self.kind == "silu":
            h = F.silu(self.up(x))
        else:  # gelu_tanh
            h = F.gelu(self.up(x), approximate="tanh")
        return self.dropout(self.down(h))
