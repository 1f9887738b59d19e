"""``attnlab bench rwkv``: per-token decode time and cache/state bytes vs context length, RWKV-4 against a
Transformer of about the same parameter count, side by side.

- Transformer: the shipped default target's shape (GQA decoder, 12.6 M parameters; its weights when its
  position limit allows, otherwise the same weights with a longer RoPE table — timing only). Its KV cache
  is filled through the cache protocol with C random positions (filling by a real prefill of 32k tokens
  would take far longer and time the same per-token step).
- RWKV-4: random weights of about the same size; its state is produced by really running the C context
  tokens through the chunked form (it does not depend on C, which is the point).

For each C the two models take turns decoding ``--new-tokens`` greedy tokens; the best of ``--repeats``
rounds counts. Bytes are ``cache.nbytes()`` of the allocated tensors.
"""

from __future__ import annotations

import torch

from attnlab.bench.clock import Stopwatch
from attnlab.bench.common import machine, markdown_table, write_json
from attnlab.commands.args import parser
from attnlab.figures import save_figure

CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768]


def rwkv_like(target_cfg, seed: int = 0):
    """A random RWKV-4 with the target's vocabulary and width and about its parameter count."""
    from attnlab import ModelConfig, build_model

    torch.manual_seed(seed)
    cfg = ModelConfig(family="rwkv", vocab_size=target_cfg.vocab_size, d_model=target_cfg.d_model,
                      n_layers=target_cfg.n_layers, n_heads=1, d_ff=target_cfg.d_ff, norm="layer",
                      position="none", tie_embeddings=target_cfg.tie_embeddings)
    return build_model(cfg).eval()


@torch.inference_mode()
def _decode(model, cache, length: int, new_tokens: int) -> float:
    cache.crop(length)
    tok = torch.zeros(1, 1, dtype=torch.long)
    with Stopwatch() as clock:
        for _ in range(new_tokens):
            tok = model(tok, cache=cache)[:, -1:].argmax(-1)
    return clock.seconds


@torch.inference_mode()
def run(contexts: list[int], new_tokens: int = 32, repeats: int = 3, log=print) -> list[dict]:
    from attnlab.bench.gqa import filled_cache, long_context_view
    from attnlab.hub import from_pretrained

    target = from_pretrained("default").eval()
    rwkv = rwkv_like(target.config)
    rows = []
    g = torch.Generator().manual_seed(0)
    for context in contexts:
        view = long_context_view(target, context + new_tokens + 1)
        kv = filled_cache(view, context, new_tokens + 1)
        state = rwkv.new_cache(1)
        rwkv(torch.randint(0, rwkv.config.vocab_size, (1, context), generator=g), cache=state)
        # decoding single tokens leaves snapshots from position `context` on: crop(context) restores it
        rwkv(torch.zeros(1, 1, dtype=torch.long), cache=state)
        state.crop(context)
        best = {"transformer": float("inf"), "rwkv": float("inf")}
        for _ in range(repeats + 1):  # the first round warms up; the models take turns
            best["transformer"] = min(best["transformer"], _decode(view, kv, context, new_tokens))
            best["rwkv"] = min(best["rwkv"], _decode(rwkv, state, context, new_tokens))
        for name, model, cache in (("transformer", view, kv), ("rwkv", rwkv, state)):
            cache.crop(context)
            nbytes = (model.new_cache(1, context).nbytes() if name == "transformer" else cache.nbytes())
            rows.append({"model": name, "params_M": model.num_parameters() / 1e6, "context": context,
                         "ms_per_token": 1e3 * best[name] / new_tokens, "cache_bytes": nbytes})
        log(f"context {context}: transformer {rows[-2]['ms_per_token']:.2f} ms/token, "
            f"rwkv {rows[-1]['ms_per_token']:.2f} ms/token")
    for name in ("transformer", "rwkv"):
        first = next(r for r in rows if r["model"] == name)
        for r in rows:
            if r["model"] == name:
                r["time_vs_first"] = r["ms_per_token"] / first["ms_per_token"]
    return rows


def draw(rows: list[dict], a, b) -> None:
    """Per-token time (axes ``a``) and cache/state MiB (axes ``b``) against context, one line per model."""
    for name, marker in (("transformer", "s-"), ("rwkv", "o-")):
        rs = [r for r in rows if r["model"] == name]
        a.plot([r["context"] for r in rs], [r["ms_per_token"] for r in rs], marker, label=name)
        b.plot([r["context"] for r in rs], [r["cache_bytes"] / 2**20 for r in rs], marker, label=name)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens already seen)")
        ax.legend()
    a.set_ylabel("ms per decoded token")
    b.set_ylabel("KV cache / state MiB")
    b.set_yscale("log")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    draw(rows, a, b)
    fig.suptitle("RWKV-4 vs a Transformer of similar size, batch 1")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main(argv: list[str]) -> int:
    p = parser("attnlab bench rwkv", "RWKV-4 vs a Transformer: per-token decode time and cache bytes vs context.")
    p.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="write a PNG here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.contexts, args.new_tokens, args.repeats)
    print(f"machine: {machine()}")
    print(markdown_table(rows, ["model", "params_M", "context", "ms_per_token", "time_vs_first", "cache_bytes"]))
    write_json(args.json, {"machine": machine(), "rows": rows})
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    return 0
