"""``attnlab info``: parameters and KV-cache bytes of a model, with its MHA/GQA/MQA siblings; with
``--memory`` alone, the measured resident memory of the loaded model, part by part.

The KV-cache figures are measured from a real ``KVCache`` allocation, not computed on paper; the memory
report reads the process's RSS around each step (``memstats.py``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from attnlab.commands.args import DECODE, add_precision, parser, torch_dtype
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


def measure_memory(name: str, precision: str | None, context: int | None, *, prompt: int = 16,
                   new_tokens: int = 8) -> dict:
    """Load ``name`` in this process and measure each part of its resident memory (bytes).

    - ``baseline``: RSS after a rehearsal (the same load, preparation and warm-up, then freed), so that what
      is paid once per process (code pages of torch's and attnlab's kernels touched for the first time, the
      thread pool, one-time tables) counts here and not as weights. Without it the first load read ~17 MiB
      beside a 85 MiB model on an AVX2 EPYC and ~37 MiB on the CI machine; after it, under 1 MiB;
    - ``weights``: bytes of the model's parameters and buffers by dtype, each memory block once (tied
      embedding and head: one table), after ``prepare_for_decode(precision)`` when a precision is given;
      ``load_growth`` is what the RSS grew by over the load and a 2-token warm-up generation (which reads
      every weight: memory-mapped weights are resident from then on), i.e. weights + module objects +
      allocator slack;
    - ``cache``: a real ``model.new_cache(1, context)`` (its ``nbytes()``) and the RSS growth it caused;
    - ``workspace``: the peak RSS above that during one generation (``prompt`` tokens in, ``new_tokens`` out:
      activations, attention scores, kernel buffers, the generation's own small cache).
    """
    import gc

    import torch

    from attnlab.hub import load_for_precision
    from attnlab.inference.fast import prepare_for_decode
    from attnlab.inference.generate import generate
    from attnlab.interop.gguf_native import parameter_count
    from attnlab.memstats import peak_rss_bytes, release_freed_memory, reset_peak, rss_bytes, tensor_bytes

    def load_and_warm_up():
        model = load_for_precision(name, precision)
        params = parameter_count(model)  # before preparing: packed weights are buffers, not parameters
        if precision is not None:
            prepare_for_decode(model, precision=precision)
        ids = (torch.arange(prompt) * 7919 % model.config.vocab_size)[None]  # (1, prompt): any valid ids
        generate(model, ids, 2, eos_token_id=None)  # every weight is read once (mapped pages become resident)
        return model, params, ids

    rehearsal = load_and_warm_up()
    del rehearsal
    gc.collect()
    release_freed_memory()
    baseline = rss_bytes()
    model, params, ids = load_and_warm_up()
    cfg = model.config
    release_freed_memory()
    loaded = rss_bytes()
    by_dtype = tensor_bytes(model)
    context = min(cfg.max_seq_len, 2048) if context is None else context
    if context < 1 or context > cfg.max_seq_len:
        raise ValueError(f"--context {context}: give a number of tokens in 1..{cfg.max_seq_len} (the model's context)")
    cache = model.new_cache(1, context)
    with_cache = rss_bytes()
    peak_known = reset_peak()
    generate(model, ids, new_tokens, eos_token_id=None)
    peak = peak_rss_bytes() if peak_known else None
    end = rss_bytes()
    weights = sum(row["bytes"] for row in by_dtype.values())
    return {
        "model": name, "precision": precision or f"{str(model.dtype).removeprefix('torch.')} (as loaded)",
        "baseline": baseline, "weights": weights, "weights_by_dtype": by_dtype, "load_growth": loaded - baseline,
        "context": context, "cache": cache.nbytes(), "cache_growth": with_cache - loaded,
        "workspace": None if peak is None else max(0, peak - with_cache), "rss_end": end,
        "total": baseline + weights + cache.nbytes(), "params": params,
    }


def print_memory(report: dict) -> None:
    mib = 1024 ** 2

    def row(label: str, value: float | None, note: str = "") -> None:
        shown = "n/a" if value is None else f"{value / mib:10.1f} MiB"
        print(f"{label:<40}{shown:>14}  {note}".rstrip())

    print(f"memory of {report['model']} at precision {report['precision']} (measured in this process)")
    row("baseline RSS (after a rehearsal load)", report["baseline"], "Python, torch, attnlab, one-time costs")
    row("weights (sum of tensor bytes)", report["weights"], f"{report['params']:,} parameters")
    for dtype, part in sorted(report["weights_by_dtype"].items()):
        row(f"  {dtype}", part["bytes"], f"{part['tensors']} tensors")
    row("  RSS growth over load + warm-up", report["load_growth"],
        f"{(report['load_growth'] - report['weights']) / mib:+.1f} MiB beside the weights")
    row(f"KV cache, {report['context']} tokens", report["cache"],
        f"RSS grew {report['cache_growth'] / mib:.1f} MiB")
    row("workspace (peak over one generation)", report["workspace"], "16-token prompt, 8 new tokens")
    row("baseline + weights + cache", report["total"], f"RSS after the generation: {report['rss_end'] / mib:.1f} MiB")


def main(argv: list[str]) -> int:
    p = parser("attnlab info", "Parameters and KV-cache bytes of a model or config.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory, .gguf file or shipped name (default, ...)")
    src.add_argument("--config", help="a ModelConfig JSON file (or JSON text)")
    p.add_argument("--memory", nargs="?", const="", metavar="BUDGET",
                   help="alone (with --model): load the model and measure its resident memory (weights by dtype, "
                        "KV cache, workspace, baseline); with a size (e.g. 8GiB): the longest context whose "
                        "KV cache fits in it")
    add_precision(p, ("fp32", "bf16", "fp16"), default=None, help="cache precision")
    add_precision(p, DECODE, default=None, flag="--precision",
                  help="with --memory: the precision the model runs in (prepare_for_decode; default: as loaded)")
    p.add_argument("--context", type=int, default=None,
                   help="with --memory: tokens of KV cache to allocate (default: min(2048, the model's context))")
    p.add_argument("--json", action="store_true", help="with --memory: print the measurements as JSON")
    args = p.parse_args(argv)
    if args.memory == "":
        if not args.model:
            raise ValueError("--memory without a size measures a loaded model: give --model too")
        import json

        report = measure_memory(args.model, args.precision, args.context)
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            print_memory(report)
        return 0
    if args.precision or args.context is not None or args.json:
        raise ValueError("--precision, --context and --json go with --memory (alone, to measure a loaded model)")
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
