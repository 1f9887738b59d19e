"""MHA -> GQA -> MQA conversion of a trained model (Ainslie et al. 2023, "GQA: Training Generalized
Multi-Query Transformer Models from Multi-Head Checkpoints").

Each new K/V head is the mean of a contiguous group of the old K/V heads (query heads keep their order,
so query head h, which used old KV head h // (H / K_old), now uses new KV head h // (H / K_new): the group
that contains its old head). Everything else is copied. A short uptraining (``attnlab train --init DIR``)
recovers most of the quality the pooling costs. ``attnlab convert`` (commands/convert.py) is its CLI.
Shape legend: K_old / K_new kv heads, D head dim, C d_model.
"""

from __future__ import annotations

import torch
from torch import nn


def _pool_heads(t: torch.Tensor, k_old: int, k_new: int, head_dim: int) -> torch.Tensor:
    """(K_old*D, ...) rows grouped by head -> (K_new*D, ...) with each new head the mean of its group."""
    rest = t.shape[1:]
    grouped = t.reshape(k_new, k_old // k_new, head_dim, *rest)  # (K_new, group, D, ...)
    return grouped.mean(dim=1).reshape(k_new * head_dim, *rest)


def to_kv_heads(model: nn.Module, n_kv_heads: int) -> nn.Module:
    """A new model with ``n_kv_heads`` K/V heads, mean-pooled from ``model``'s (which is left unchanged)."""
    from attnlab.models import build_model

    cfg = model.config
    if cfg.family not in ("decoder", "encoder", "seq2seq"):
        raise ValueError(f"family={cfg.family!r} has no K/V heads to convert")
    if not isinstance(n_kv_heads, int) or n_kv_heads < 1 or cfg.n_kv_heads % n_kv_heads != 0:
        valid = [d for d in range(1, cfg.n_kv_heads + 1) if cfg.n_kv_heads % d == 0]
        raise ValueError(
            f"--kv-heads {n_kv_heads} must divide the model's current {cfg.n_kv_heads} KV heads "
            f"(K/V heads can only be merged in whole groups); valid: {valid}"
        )
    new_cfg = cfg.replace(n_kv_heads=n_kv_heads)
    new = build_model(new_cfg).to(model.dtype)
    state = model.state_dict()
    out = {}
    for name, tensor in state.items():
        if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            out[name] = _pool_heads(tensor, cfg.n_kv_heads, n_kv_heads, cfg.head_dim)
        else:
            out[name] = tensor
    new.load_state_dict(out)
    return new.eval() if not model.training else new
