"""The residual block: self-attention, optional cross-attention and FFN, each wrapped in a residual
connection and a norm.

Where the norm sits is ``ModelConfig.norm_position``::

    pre  (GPT-2, Llama)         post (Vaswani et al. 2017, BERT, BART)   sandwich (Ding et al. 2021)
      x ─┬─> Norm -> F ─┐         x ─┬─> F ─┐                             x ─┬─> Norm -> F -> Norm ─┐
         └─────────────(+)           └─────(+)─> Norm                       └──────────────────────(+)

    (F is each sublayer in turn: self-attention, cross-attention in a seq2seq decoder, then the FFN.)

Pre-Norm keeps an identity path from input to output (gradients reach early layers unscaled, so deep
stacks train without warmup); Post-Norm normalises the sum, which bounds activations but puts a norm
on the gradient path of every layer (Xiong et al. 2020); Sandwich also normalises each sublayer's output
before adding it, bounding what any one sublayer can add. ``residual=False`` drops the skip connections
(an experiment of the tour: it shows why they are there).

Shape legend: B batch, T time, S source length, C d_model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor, nn

from attnlab.attention.infini import InfiniAttention
from attnlab.attention.mha import MultiHeadAttention
from attnlab.config import ModelConfig
from attnlab.inference.cache import AttentionCache
from attnlab.layers.ffn import FFN
from attnlab.layers.norm import build_norm

if TYPE_CHECKING:
    from attnlab.inference.infini_state import InfiniState

# ModelConfig.attention_mechanism -> the self-attention module (both take (cfg, causal=...) and share the forward)
ATTENTION: dict[str, type[nn.Module]] = {"softmax": MultiHeadAttention, "infini": InfiniAttention}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, *, causal: bool, cross: bool = False) -> None:
        super().__init__()
        self.place = cfg.norm_position
        self.residual = cfg.residual
        sandwich = cfg.norm_position == "sandwich"

        def norm() -> nn.Module:
            return build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)

        self.attn_norm = norm()
        self.attn = ATTENTION[cfg.attention_mechanism](cfg, causal=causal)
        self.attn_post_norm = norm() if sandwich else None
        self.cross_norm = norm() if cross else None
        self.cross_attn = MultiHeadAttention(cfg, causal=False, cross=True) if cross else None
        self.cross_post_norm = norm() if cross and sandwich else None
        self.ffn_norm = norm()
        self.ffn = FFN(cfg)
        self.ffn_post_norm = norm() if sandwich else None

    def _sublayer(self, x: Tensor, f: Callable[[Tensor], Tensor], norm: nn.Module, post: nn.Module | None,
                  mask: Tensor | None) -> Tensor:
        skip = x if self.residual else 0.0
        if self.place == "pre":
            return skip + f(norm(x, mask))
        if self.place == "sandwich":
            return skip + post(f(norm(x, mask)), mask)
        return norm(skip + f(x), mask)  # post

    def forward(
        self,
        x: Tensor,
        *,
        rope=None,
        key_mask: Tensor | None = None,
        token_mask: Tensor | None = None,
        cache: AttentionCache | InfiniState | None = None,  # what the layers' attention takes (static: StaticSlots)
        layer: int = 0,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
    ) -> Tensor:  # (B, T, C) -> (B, T, C)
        """``key_mask`` (B, S) marks attendable keys; ``token_mask`` (B, T) real tokens among the inputs
        (for BatchNorm statistics); ``memory`` (B, S_src, C) is the encoder output for cross-attention."""
        x = self._sublayer(x, lambda h: self.attn(h, rope=rope, key_mask=key_mask, cache=cache, layer=layer),
                           self.attn_norm, self.attn_post_norm, token_mask)
        if self.cross_attn is not None:
            x = self._sublayer(
                x, lambda h: self.cross_attn(h, key_mask=memory_mask, cache=cache, layer=layer, memory=memory),
                self.cross_norm, self.cross_post_norm, token_mask)
        return self._sublayer(x, self.ffn, self.ffn_norm, self.ffn_post_norm, token_mask)
