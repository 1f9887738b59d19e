"""MHA -> GQA -> MQA conversion of a trained checkpoint (Ainslie et al. 2023, "GQA: Training Generalized
Multi-Query Transformer Models from Multi-Head Checkpoints").

Each new K/V head is the mean of a contiguous group of the old K/V heads (query heads keep their order,
so query head h, which used old KV head h // (H / K_old), now uses new KV head h // (H / K_new): the group
that contains its old head). Everything else is copied. A short uptraining (``attnlab train --init DIR``)
recovers most of the quality the pooling costs.

``attnlab convert --model PATH --kv-heads K --out DIR`` writes a normal model directory.
Shape legend: K_old / K_new kv heads, D head dim, C d_model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from attnlab.cli import parser

if TYPE_CHECKING:  # torch loads after the flags are checked
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


def check_out(out: Path, source: Path | None, model_name: str) -> None:
    """Refuse an ``--out`` whose writing would replace the current directory or the model being read.

    The model directory is written as a whole (atomically), so ``--out .`` or ``--out`` equal to the source
    (or to a folder holding either) would put the new model in place of what is there.
    """
    target = out.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise ValueError(f"--out {out} is the current directory (or holds it): the model directory would take its "
                         f"place; give a new directory name, e.g. --out {model_name.rstrip('/').split('/')[-1]}-gqa")
    src = None if source is None else source.expanduser().resolve()
    if src is not None and (target == src or target in src.parents):
        raise ValueError(f"--out {out} is the source model {model_name} (or holds it): converting in place would "
                         f"overwrite the weights being read; give another directory")
    if target.is_file():
        raise ValueError(f"--out {out} is a file; give a directory name for the converted model")


def main(argv: list[str]) -> int:
    p = parser("attnlab convert", "Convert a checkpoint to fewer KV heads (MHA -> GQA -> MQA).")
    p.add_argument("--model", required=True, help="model directory, .gguf file or shipped name")
    p.add_argument("--kv-heads", type=int, required=True, help="the new number of KV heads (divides the current)")
    p.add_argument("--out", required=True, help="output model directory (new, empty, or an earlier attnlab model)")
    p.add_argument("--overwrite", action="store_true",
                   help="also replace a training run's files in --out (never files attnlab did not write)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="storage dtype of the written weights (default: the model's)")
    args = p.parse_args(argv)
    if args.kv_heads < 1:
        raise ValueError(f"--kv-heads {args.kv_heads}: give a number of KV heads >= 1")
    given = Path(args.model).expanduser()
    check_out(Path(args.out), given if given.exists() else None, args.model)  # before the model loads
    import torch

    from attnlab.checkpoint import check_target, save_model

    check_target(args.out, overwrite=args.overwrite)  # foreign files in --out: refused before the model loads
    from attnlab.hub import from_pretrained, resolve_path

    check_out(Path(args.out), resolve_path(args.model), args.model)  # a shipped name, resolved
    model = from_pretrained(args.model)
    before = model.config.n_kv_heads
    new = to_kv_heads(model, args.kv_heads)
    out = Path(args.out)
    src = resolve_path(args.model)

    def tokenizer_files(tmp: Path) -> None:  # the model's own tokenizer goes along, in the same atomic write
        for extra in ("tokenizer.json", "special_tokens.json", "tokenizer_config.json"):
            if src.is_dir() and (src / extra).is_file():
                shutil.copy(src / extra, tmp / extra)

    save_model(new, out, dtype=getattr(torch, args.dtype) if args.dtype else None, extra_files=tokenizer_files,
               overwrite=args.overwrite)
    kv_old = model.config.kv_cache_bytes_per_token(4)
    kv_new = new.config.kv_cache_bytes_per_token(4)
    print(f"converted {args.model}: {before} -> {args.kv_heads} KV heads; KV cache {kv_old:,} -> {kv_new:,} "
          f"bytes/token (fp32); written to {out}")
    print(f"uptrain it with: attnlab train --init {out} ...")
    return 0
