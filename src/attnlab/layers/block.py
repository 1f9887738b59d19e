"""The residual block: self-attention and FFN, each wrapped in a residual connection and a norm.

Where the norm sits is ``ModelConfig.norm_position``::

    pre  (GPT-2, Llama):            post (Vaswani et al. 2017, BERT):
      x ──┬─> Norm -> Attn ─┐          x ──┬─> Attn ─┐
          └────────────────(+)             └────────(+)-> Norm
      x ──┬─> Norm -> FFN ──┐          x ──┬─> FFN ──┐
          └────────────────(+)             └────────(+)-> Norm

Pre-Norm keeps an identity path from input to output (gradients reach early layers unscaled, so deep
stacks train without warmup); Post-Norm normalises the sum, which bounds activations but puts a norm
on the gradient path of every layer (Xiong et al. 2020). ``residual=False`` drops the skip connections
(an experiment of the tour: it shows why they are there).

Shape legend: B batch, T time, C d_model.
"""

from __future__ import annotations

from torch import Tensor, nn

from attnlab.attention.mha import MultiHeadAttention
from attnlab.config import ModelConfig
from attnlab.layers.ffn import FFN
from attnlab.layers.norm import build_norm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, *, causal: bool) -> None:
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.residual = cfg.residual
        self.attn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
        self.attn = MultiHeadAttention(cfg, causal=causal)
        self.ffn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
        self.ffn = FFN(cfg)

    def forward(
        self, x: Tensor, *, rope=None, key_mask: Tensor | None = None, cache=None, layer: int = 0
    ) -> Tensor:  # (B, T, C) -> (B, T, C)
        skip = self.residual
        if self.pre:
            h = self.attn(self.attn_norm(x), rope=rope, key_mask=key_mask, cache=cache, layer=layer)
            x = x + h if skip else h
            h = self.ffn(self.ffn_norm(x))
            return x + h if skip else h
        h = self.attn(x, rope=rope, key_mask=key_mask, cache=cache, layer=layer)
        x = self.attn_norm(x + h if skip else h)
        h = self.ffn(x)
        return self.ffn_norm(x + h if skip else h)
