"""``attnlab info``: parameters and KV-cache bytes of a model, with its MHA/GQA/MQA siblings.

The KV-cache figures are measured from a real ``KVCache`` allocation, not computed on paper.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from attnlab.commands.args import add_precision, parser, torch_dtype
from attnlab.config import ModelConfig

if TYPE_CHECKING:
    import torch

UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
         "tb": 1000**4, "tib": 1024**4}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"--memory {text!r} is not a size; write e.g. 8GiB, 512MiB or 2e9 bytes as 2000000000")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def kv_bytes_per_token(cfg: ModelConfig, n_kv_heads: int, dtype: torch.dtype) -> int:
    """Bytes one position occupies in a real cache (measured on a 1-token allocation)."""
    from attnlab.inference.cache import KVCache

    return KVCache(cfg.n_layers, 1, n_kv_heads, cfg.head_dim, 1, dtype=dtype).nbytes()


def sibling_rows(cfg: ModelConfig, dtype: torch.dtype, memory: int | None) -> list[dict]:
    rows = []
    for k in sorted({d for d in range(1, cfg.n_heads + 1) if cfg.n_heads % d == 0}, reverse=True):
        kind = "MHA" if k == cfg.n_heads else ("MQA" if k == 1 else "GQA")
        per_token = kv_bytes_per_token(cfg, k, dtype)
        row = {"n_kv_heads": k, "kind": kind, "bytes_per_token": per_token, "current": k == cfg.n_kv_heads}
        if memory is not None:
            row["max_context"] = memory // per_token
        rows.append(row)
    return rows


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def main(argv: list[str]) -> int:
    p = parser("attnlab info", "Parameters and KV-cache bytes of a model or config.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory, .gguf file or shipped name (default, ...)")
    src.add_argument("--config", help="a ModelConfig JSON file (or JSON text)")
    p.add_argument("--memory", help="a memory budget for the KV cache (e.g. 8GiB): longest context that fits")
    add_precision(p, ("fp32", "bf16", "fp16"), default=None, help="cache precision")
    args = p.parse_args(argv)
    memory = parse_bytes(args.memory) if args.memory else None
    cfg = ModelConfig.from_json(args.config) if args.config else None  # a bad config fails before torch loads

    import torch

    if args.model:
        from attnlab.hub import from_pretrained

        model = from_pretrained(args.model)
        cfg = model.config
        params = model.num_parameters()
        dtype = torch_dtype(args.dtype) if args.dtype else model.dtype
    else:
        from attnlab.models import build_model

        assert cfg is not None
        with torch.device("meta"):
            params = build_model(cfg).num_parameters()
        dtype = torch_dtype(args.dtype) if args.dtype else torch.float32

    print(f"family            {cfg.family}")
    print(f"parameters        {params:,}")
    if cfg.family == "rwkv":  # a recurrence: a constant state instead of a cache that grows per token
        from attnlab.inference.rwkv_state import RWKVState

        state = RWKVState.for_config(cfg, 1).nbytes()
        print(f"layers x d_model  {cfg.n_layers} x {cfg.d_model}  (RWKV-{cfg.rwkv_version})")
        print(f"state             {state:,} bytes per sequence, the same at any context length (no KV cache)")
        return 0
    print(f"layers x d_model  {cfg.n_layers} x {cfg.d_model}  (heads {cfg.n_heads}, kv heads {cfg.n_kv_heads}, head_dim {cfg.head_dim})")
    print(f"context           {cfg.max_seq_len} tokens")
    print(f"cache dtype       {str(dtype).replace('torch.', '')}")
    print()
    header = f"{'kv heads':>8}  {'kind':<4}  {'KV bytes/token':>14}  {'at full context':>15}"
    if memory is not None:
        header += f"  {'max context in ' + args.memory:>22}"
    print(header)
    for row in sibling_rows(cfg, dtype, memory):
        line = (f"{row['n_kv_heads']:>8}  {row['kind']:<4}  {row['bytes_per_token']:>14,}  "
                f"{human(row['bytes_per_token'] * cfg.max_seq_len):>15}")
        if memory is not None:
            line += f"  {row['max_context']:>22,}"
        if row["current"]:
            line += "   <- this model"
        elif cfg.n_kv_heads % row["n_kv_heads"] == 0:
            line += f"   attnlab convert --kv-heads {row['n_kv_heads']}"
        print(line)
    if memory is not None:
        print(f"\n(max context: KV cache alone, batch 1, weights not counted; the model was trained for "
              f"{cfg.max_seq_len} positions)")
    return 0
