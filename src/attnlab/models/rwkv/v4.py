"""RWKV-4: attention rewritten as a recurrence (Peng et al. 2023, "RWKV: Reinventing RNNs for the
Transformer Era"). Linear time in the sequence length, a constant-size state per token at inference.

Each block keeps the Transformer's residual structure — ``x + TimeMix(LN(x))`` then ``x + ChannelMix(LN(x))``
— with time-mixing in the place of attention and channel-mixing in the place of the FFN:

- token shift: every mixing layer sees ``lerp(x_{t-1}, x_t, μ)`` with learned per-channel ``μ``;
- time mixing: ``k, v, r = W_k x^k, W_v x^v, W_r x^r``; the WKV operator

      wkv_t = (Σ_{i<t} e^{-(t-1-i)w + k_i} v_i + e^{u + k_t} v_t) / (Σ_{i<t} e^{-(t-1-i)w + k_i} + e^{u + k_t})

  with a per-channel decay ``w = exp(time_decay) > 0`` and bonus ``u = time_first`` for the current token;
  the output is ``W_o (σ(r) ⊙ wkv)``;
- channel mixing: ``σ(W_r x^r) ⊙ W_v relu(W_k x^k)²``.

Two modes on the same weights: the *chunked parallel* form (``models/rwkv/wkv4.py``) for training over
whole sequences, and the *recurrent* form that carries an ``RWKVState`` (``inference/rwkv_state.py``) — the
family's cache — one token at a time. Both keep the sums in log space with a running maximum (the
"max trick"), so long sequences neither overflow nor underflow. Parameter names mirror Hugging Face's
``RwkvForCausalLM`` so loading is a plain copy (``interop/hf_rwkv.py``).

Shape legend: B batch, T time, C d_model, F d_ff, V vocab, L layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.config import ModelConfig
from attnlab.inference.rwkv_state import STEP_MAX, RWKVState
from attnlab.layers.stack import check_token_ids
from attnlab.models.base import AttnlabModel
from attnlab.models.rwkv.wkv4 import wkv_chunked, wkv_step


def token_shift(x: Tensor, prev: Tensor | None) -> Tensor:
    """x_{t-1} for every t: the previous call's last input (or zeros) for t = 0.  (B, T, C) -> (B, T, C)"""
    first = torch.zeros_like(x[:, :1]) if prev is None else prev[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


class TimeMix(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C = cfg.d_model
        self.time_decay = nn.Parameter(torch.zeros(C))
        self.time_first = nn.Parameter(torch.zeros(C))
        self.time_mix_key = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_value = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_receptance = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)

    def forward(self, x: Tensor, layer_state: dict[str, Tensor] | None) -> Tensor:  # (B, T, C) -> (B, T, C)
        prev = None if layer_state is None else layer_state["att_x"]
        xx = token_shift(x, prev)
        k = self.key(x * self.time_mix_key + xx * (1 - self.time_mix_key))
        v = self.value(x * self.time_mix_value + xx * (1 - self.time_mix_value))
        r = torch.sigmoid(self.receptance(x * self.time_mix_receptance + xx * (1 - self.time_mix_receptance)))
        w = -torch.exp(self.time_decay.float())  # log of the per-step decay factor (< 0)
        u = self.time_first.float()
        if layer_state is None:
            wkv, _ = wkv_chunked(w, u, k.float(), v.float(), None)
        elif x.shape[1] == 1:
            wkv, new = wkv_step(w, u, k[:, 0].float(), v[:, 0].float(), layer_state)
            wkv = wkv[:, None]
            layer_state.update(new)
        else:
            wkv, new = wkv_chunked(w, u, k.float(), v.float(), layer_state)
            layer_state.update(new)
        if layer_state is not None:
            layer_state["att_x"] = x[:, -1].float()
        return self.output(r * wkv.to(r.dtype))


class ChannelMix(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C, Fd = cfg.d_model, cfg.d_ff
        self.time_mix_key = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_receptance = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, Fd, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(Fd, C, bias=False)

    def forward(self, x: Tensor, layer_state: dict[str, Tensor] | None) -> Tensor:  # (B, T, C) -> (B, T, C)
        xx = token_shift(x, None if layer_state is None else layer_state["ffn_x"])
        k = torch.square(F.relu(self.key(x * self.time_mix_key + xx * (1 - self.time_mix_key))))  # (B, T, F)
        r = torch.sigmoid(self.receptance(x * self.time_mix_receptance + xx * (1 - self.time_mix_receptance)))
        if layer_state is not None:
            layer_state["ffn_x"] = x[:, -1].float()
        return r * self.value(k)


class RWKVBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = TimeMix(cfg)
        self.feed_forward = ChannelMix(cfg)

    def forward(self, x: Tensor, layer_state: dict[str, Tensor] | None) -> Tensor:
        x = x + self.attention(self.ln1(x), layer_state)
        return x + self.feed_forward(self.ln2(x), layer_state)


class RWKVLM(AttnlabModel):
    """Embedding -> LayerNorm -> N RWKV blocks -> LayerNorm -> LM head (``rwkv_version=4``; RWKV-7 is the
    subclass ``models/rwkv/v7.py: RWKV7LM``, which changes the blocks, their init and the state's contents).

    ``forward(input_ids, cache=None) -> logits (B, T, V)``; with an ``RWKVState`` the tokens continue the
    state's sequence (a prompt through the chunked form, a few tokens one by one with a snapshot after
    each, so that speculative decoding can roll back).
    """

    version = 4

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.rwkv_version != self.version:
            raise ValueError(f"{type(self).__name__} is RWKV-{self.version}, the config asks for "
                             f"rwkv_version={cfg.rwkv_version}: build it with attnlab.build_model(cfg)")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pre_ln = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(self.make_block(cfg, i) for i in range(cfg.n_layers))
        self.ln_out = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def make_block(self, cfg: ModelConfig, layer_id: int) -> nn.Module:
        return RWKVBlock(cfg)

    def run_blocks(self, x: Tensor, cache: RWKVState | None) -> Tensor:
        """Every block over x (B, T, C), continuing the cache's sequence when one is given."""
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layer(i))
        return x

    def init_weights(self) -> None:
        """Normal weights (output projections scaled by depth), then the time parameters spread over
        channels and layers so that some channels remember long and others short, as the paper does."""
        super().init_weights()
        L, C = self.config.n_layers, self.config.d_model
        ramp = torch.arange(C, dtype=torch.float32) / C  # 0 .. 1 over channels
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                depth = i / max(1, L - 1)  # 0 for the first layer, 1 for the last
                shallow = 1.0 - i / L
                att, ffn = block.attention, block.feed_forward
                att.time_decay.copy_(-6 + 5 * (torch.arange(C) / max(1, C - 1)) ** (0.7 + 1.3 * depth))
                att.time_first.copy_(math.log(0.3) + 0.5 * ((torch.arange(C) + 1) % 3 - 1))
                att.time_mix_key.copy_(ramp.pow(shallow)[None, None])
                att.time_mix_value.copy_(ramp.pow(shallow)[None, None] + 0.3 * depth)
                att.time_mix_receptance.copy_(ramp.pow(0.5 * shallow)[None, None])
                ffn.time_mix_key.copy_(ramp.pow(shallow)[None, None])
                ffn.time_mix_receptance.copy_(ramp.pow(shallow)[None, None])

    def new_cache(self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None) -> RWKVState:
        """A constant-size state: ``max_len`` is accepted for the cache protocol and ignored."""
        return RWKVState.for_config(self.config, batch, device=self.device)

    def begin_generation(self, input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int):
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
            raise ValueError("RWKV generation does not support padding: give prompts of equal length")
        return self.new_cache(input_ids.shape[0]), input_ids, None

    def forward(self, input_ids: Tensor, cache: RWKVState | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        B, T = input_ids.shape
        check_token_ids(input_ids, self.config.vocab_size)
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("RWKV has no attention mask: padding would enter the recurrence; give unpadded input")
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"the RWKV state was made for batch {cache.batch_size}, input has batch {B}")
        x = self.pre_ln(self.embed(input_ids))  # (B, T, C)
        if cache is None:
            return self.lm_head(self.ln_out(self.run_blocks(x, None)))
        if T <= STEP_MAX:  # a few tokens (decode, speculative verify): one at a time, a snapshot after each
            outs = []
            for t in range(T):
                outs.append(self.run_blocks(x[:, t:t + 1], cache))
                cache.advance(1, snapshot=True)
            x = torch.cat(outs, dim=1)
        else:  # a prompt: the chunked form, layer by layer
            x = self.run_blocks(x, cache)
            cache.advance(T, snapshot=True)
        return self.lm_head(self.ln_out(x))
