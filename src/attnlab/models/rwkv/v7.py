"""RWKV-7 "Goose" (Peng et al. 2025, "RWKV-7 'Goose' with Expressive Dynamic State Evolution",
arXiv 2503.14456): the RWKV block whose time mixing keeps, per head, a matrix-valued state updated by a
generalised delta rule with vector-valued decay and in-context learning rate (``rwkv_version=7``).

The block is RWKV-4's — ``x + TimeMix(LN(x))`` then ``x + ChannelMix(LN(x))``, token shift in both — with:

- token shift with one learned lerp per input: ``x^□ = x_t + (x_{t-1} - x_t) ⊙ μ_□`` for □ in r, w, k, v, a, g;
- low-rank MLPs (``X0 + tanh/σ(x A) B``) for the data-dependent parts:
  decay ``w_t = exp(-e^{-1/2} σ(w0 + tanh(x^w W1) W2))`` ∈ (e^{-e^{-1/2}}, 1) ≈ (0.545, 1) per channel (the
  reference's form, the paper's ``exp(-e^{-0.5} σ(d))``), in-context learning rate
  ``a_t = σ(a0 + x^a A1 A2)``, gate ``g_t = σ(x^g G1) G2``, and, from the second layer on, the *value
  residual* ``v_t ← lerp(v_t, v^{(0)}_t, σ(v0 + x^v V1 V2))`` towards the first layer's value;
- ``κ̂ = L2norm(k ⊙ k_k)`` per head (the "removal key"), ``k̃ = k ⊙ (1 + (a - 1) ⊙ k_a)`` (the written key);
- the state update ``S_t = S_{t-1}(diag(w_t) - κ̂_t (a_t ⊙ κ̂_t)ᵀ) + v_t k̃_tᵀ`` and ``o_t = S_t r_t``
  (``models/rwkv/wkv7.py`` states the orientation: rows of S are value channels);
- out ``= W_o (g ⊙ (GroupNorm_H(o) + (Σ_head r ⊙ k̃ ⊙ r_k) v))``: a per-head norm plus a bonus for the
  current token;
- channel mixing ``W_v relu(W_k x^k)²`` (no receptance in RWKV-7).

The first layer's value is recomputed for each token from that layer's input, so the state (per layer: two
token-shift vectors and S (B, H, N, N), fp32) does not grow with the sequence. The block-level names are those
of attnlab's RWKV-4 (``blocks.i.attention``, ``blocks.i.feed_forward``); the names inside follow the
reference's RWKV-7 (``x_r``, ``w0/w1/w2``, ``k_k``, ``ln_x``, ...). Head size is ``cfg.head_dim``.

Shape legend: B batch, T time, C d_model, H heads, N head size (C = H·N), F d_ff.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.config import ModelConfig
from attnlab.inference.rwkv_state import RWKVState
from attnlab.models.rwkv.v4 import RWKVLM, token_shift
from attnlab.models.rwkv.wkv7 import wkv7_chunked, wkv7_step

LOG_DECAY_SCALE = math.exp(-0.5)  # log w = -e^{-1/2} σ(·): the decay never drops below e^{-0.607} per step


def lora_rank(d_model: int, factor: float) -> int:
    """The width of a low-rank MLP: ~factor·sqrt(C) in multiples of 32 (the reference's rule: 64, 64, 32
    and 128 for the decay, a, value and gate at C = 768), at least 32 and at most C."""
    return min(d_model, max(32, 32 * round(factor * math.sqrt(d_model) / 32)))


class TimeMix7(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        C, H, N = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.layer_id, self.n_heads, self.head_size = layer_id, H, N
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, C)))
        dw, da, dv, dg = (lora_rank(C, f) for f in (2.5, 2.5, 1.7, 5.0))
        self.w0, self.w1, self.w2 = nn.Parameter(torch.zeros(1, 1, C)), nn.Parameter(torch.zeros(C, dw)), \
            nn.Parameter(torch.zeros(dw, C))
        self.a0, self.a1, self.a2 = nn.Parameter(torch.zeros(1, 1, C)), nn.Parameter(torch.zeros(C, da)), \
            nn.Parameter(torch.zeros(da, C))
        if layer_id > 0:  # the first layer's value is the one the others mix in
            self.v0, self.v1, self.v2 = nn.Parameter(torch.zeros(1, 1, C)), nn.Parameter(torch.zeros(C, dv)), \
                nn.Parameter(torch.zeros(dv, C))
        self.g1, self.g2 = nn.Parameter(torch.zeros(C, dg)), nn.Parameter(torch.zeros(dg, C))
        self.k_k = nn.Parameter(torch.zeros(1, 1, C))
        self.k_a = nn.Parameter(torch.zeros(1, 1, C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        # eps grows with the head size (the reference's 64e-5 at N = 64): the per-head sums are large
        self.ln_x = nn.GroupNorm(H, C, eps=cfg.norm_eps * N)

    def forward(self, x: Tensor, v_first: Tensor | None,
                layer_state: dict[str, Tensor] | None) -> tuple[Tensor, Tensor]:  # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        H, N = self.n_heads, self.head_size
        xx = token_shift(x, None if layer_state is None else layer_state["att_x"]) - x  # x_{t-1} - x_t
        xr, xw, xk, xv, xa, xg = (x + xx * mu for mu in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        d = self.w0 + torch.tanh(xw @ self.w1) @ self.w2  # (B, T, C)
        logw = -LOG_DECAY_SCALE * torch.sigmoid(d.float())  # log of the decay, in (-0.607, 0)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)  # value residual
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).float().view(B, T, H, N), dim=-1)  # (B, T, H, N), unit per head
        k = k * (1 + (a - 1) * self.k_a)

        def heads(t: Tensor) -> Tensor:  # (B, T, C) -> (B, T, H, N) fp32
            return t.float().view(B, T, H, N)

        rh, kh, vh = heads(r), heads(k), heads(v)
        args = (rh, logw.view(B, T, H, N), kh, vh, -kk, kk * heads(a))
        if layer_state is None:
            o, _ = wkv7_chunked(*args, None)
        elif T == 1:
            o, S = wkv7_step(*(t[:, 0] for t in args), layer_state["S"])  # (B, H, N)
            o = o[:, None]
            layer_state["S"] = S
        else:
            o, S = wkv7_chunked(*args, layer_state["S"])
            layer_state["S"] = S
        if layer_state is not None:
            layer_state["att_x"] = x[:, -1].float()
        o = F.group_norm(o.reshape(B * T, C), H, self.ln_x.weight.float(), self.ln_x.bias.float(), self.ln_x.eps)
        bonus = (rh * kh * self.r_k.float()).sum(dim=-1, keepdim=True) * vh  # (B, T, H, N)
        o = o.view(B, T, C) + bonus.reshape(B, T, C)
        return self.output(o.to(x.dtype) * g), v_first


class ChannelMix7(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.x_k = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.key = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.value = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor, layer_state: dict[str, Tensor] | None) -> Tensor:  # (B, T, C) -> (B, T, C)
        xx = token_shift(x, None if layer_state is None else layer_state["ffn_x"]) - x
        if layer_state is not None:
            layer_state["ffn_x"] = x[:, -1].float()
        return self.value(torch.square(F.relu(self.key(x + xx * self.x_k))))  # (B, T, F) in between


class RWKV7Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = TimeMix7(cfg, layer_id)
        self.feed_forward = ChannelMix7(cfg)

    def forward(self, x: Tensor, v_first: Tensor | None,
                layer_state: dict[str, Tensor] | None) -> tuple[Tensor, Tensor]:
        h, v_first = self.attention(self.ln1(x), v_first, layer_state)
        x = x + h
        return x + self.feed_forward(self.ln2(x), layer_state), v_first


class RWKV7LM(RWKVLM):
    """Embedding -> LayerNorm -> N RWKV-7 blocks -> LayerNorm -> LM head (``rwkv_version=7``).

    The forward, the cache protocol (``RWKVState``: a prompt through the chunked form, a few tokens one by
    one with a snapshot after each) and generation are RWKV-4's; only the blocks and the state differ.
    """

    version = 7

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.n_heads * cfg.head_dim != cfg.d_model:
            raise ValueError(f"RWKV-7 splits d_model into heads: n_heads={cfg.n_heads} x head_dim={cfg.head_dim} "
                             f"must equal d_model={cfg.d_model} (leave head_dim unset to derive it)")
        super().__init__(cfg)

    def make_block(self, cfg: ModelConfig, layer_id: int) -> nn.Module:
        return RWKV7Block(cfg, layer_id)

    def run_blocks(self, x: Tensor, cache: RWKVState | None) -> Tensor:
        v_first = None  # the first layer's value, handed to the others (value residual)
        for i, block in enumerate(self.blocks):
            x, v_first = block(x, v_first, None if cache is None else cache.layer(i))
        return x

    def init_weights(self) -> None:
        """Projections ~ N(0, (s/sqrt(C))²) with small keys and small output projections; the token-shift
        lerps, decays, learning rates and value-residual gates spread over channels and layers (so that some
        channels remember long and others short, in every head); low-rank MLPs small but not zero, so every
        parameter learns from the first step."""
        super(RWKVLM, self).init_weights()  # normal weights and embeddings (AttnlabModel)
        cfg = self.config
        L, C, N = cfg.n_layers, cfg.d_model, cfg.head_dim
        n = torch.arange(C, dtype=torch.float32)
        ramp = n / C  # 0 .. 1 over channels
        linear = n / max(1, C - 1) - 0.5  # -0.5 .. 0.5
        within = (n % N) / max(1, N - 1) * 2 - 1  # -1 .. 1 inside each head
        zigzag = within * within.abs()
        std = 1 / math.sqrt(C)
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                depth = i / max(1, L - 1)  # 0 for the first layer, 1 for the last
                shallow = 1.0 - i / L
                att, ffn = block.attention, block.feed_forward
                for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9),
                                    ("x_g", 0.2)):
                    getattr(att, name).copy_(1 - ramp.pow(power * shallow))
                # decay logits from about -5.5 (w ≈ 0.998: long memory) to about 0.5 (w ≈ 0.69), zigzag in a head
                att.w0.copy_(-5.5 + 6 * (n / max(1, C - 1)) ** (1 + depth ** 0.3) + 2.5 * zigzag)
                att.a0.copy_(-0.2 + 0.3 * zigzag + 0.4 * linear)
                att.k_k.fill_(0.85)
                att.k_a.fill_(1.0)
                att.r_k.fill_(-0.04)
                att.ln_x.weight.fill_(((i + 1) / L) ** 0.7)
                att.ln_x.bias.zero_()
                lora = [(att.w1, att.w2), (att.a1, att.a2), (att.g1, att.g2)]
                if i > 0:
                    att.v0.copy_(0.7 - 0.4 * linear)
                    lora.append((att.v1, att.v2))
                for down, up in lora:
                    down.normal_(0.0, 0.5 * std)
                    up.normal_(0.0, 0.1 / math.sqrt(up.shape[0]))
                att.receptance.weight.normal_(0.0, 0.5 * std)
                att.key.weight.normal_(0.0, 0.1 * std)
                att.value.weight.normal_(0.0, 0.5 * std)
                att.output.weight.normal_(0.0, 0.1 * std)
                ffn.x_k.copy_(1 - ramp.pow(shallow ** 4))
                ffn.key.weight.normal_(0.0, 0.5 * std)
                ffn.value.weight.normal_(0.0, 0.1 / math.sqrt(cfg.d_ff))
