"""``attnlab bench decode``: prefill and decode tokens/s of attnlab's fast path vs Hugging Face ``generate``
on the same weights, at each precision, with the memory-bandwidth roofline measured in the same run.

Models: a random Llama with SmolLM2-135M's geometry (30 layers, d 576, 9 heads / 3 KV heads, tied 49,152
vocabulary; ``smollm2-135m``) and the shipped default target (``default``, exported to a HF Llama
directory) — both written once and loaded by each library. For every (batch, prompt length):

- HF ``generate`` in fp32 and bf16; attnlab ``prepare_for_decode`` in fp32, bf16 and int8 (``--precisions``
  restricts them; HF fp32 always runs, as the reference), optionally also compiled (``--compile``: rows
  ``attnlab static``, the static-shape decode graphs of ``inference/static.py``; ``--compile static-jit``: the
  same graphs through ``torch.compile`` in this process; ``--compile dynamic``: ``attnlab dynamic``,
  ``torch.compile(dynamic=True)`` over the forward). Compiled variants are warmed up
  (compiled) before timing; ``compile_s`` reports the seconds their first calls took.
- prefill tok/s = batch x prompt / time of the first token; decode tok/s = batch x (N - 1) / (time of
  N tokens - time of 1 token): the per-token cost after the prompt.
- the default path: the first attnlab row, ``attnlab default``, is the call a user writes without flags,
  ``attnlab.generate(model, ids, n)`` on a model straight from ``from_pretrained`` (fp32, unprepared,
  uncompiled), so the distance between it and the tuned rows is always in the table.
- same tokens: attnlab fp32 (prepared, and the default call) must give HF fp32's greedy tokens, or no
  speed-up is reported for any row of that setting. Lower precisions are compared with attnlab fp32
  (``agree`` = fraction of equal tokens; random weights give near-flat logits, so low-precision tokens are
  only meaningful on ``default``).
- quality beside speed: every row's perplexity on ``PPL_TOKENS`` held-out tokens (the start of the default
  corpus's validation split, by the shipped tokenizer; one forward, untimed), and ``ppl_change``, its
  relative change from attnlab fp32's. A row whose perplexity moved by more than ``PPL_LIMIT`` (1%) is
  flagged (``quality`` column, hatched bar with a "!" in the plot): its speed-up bought a worse model.
  On the random-weight shapes the ids are the same text's, wrapped into the smaller vocabulary: the
  perplexity itself means nothing there, its change from fp32 still measures the numerical damage.
- roofline = weight bytes read per decode step x decode steps/s / memory bandwidth probe
  (a large copy, read + write, or a read-only sum, whichever is faster) measured in the same run.
"""

from __future__ import annotations

import copy
import functools
import json
import tempfile
from pathlib import Path

import torch

from attnlab.bench.clock import Stopwatch
from attnlab.bench.common import machine, markdown_table, write_json
from attnlab.commands.args import add_compile, parser, precision_list
from attnlab.figures import save_figure

SHAPES = {
    # name: LlamaConfig keyword arguments
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
}
HF_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRECISIONS = ("fp32", "bf16", "int8")  # the attnlab precisions this benchmark times (--precisions)
PPL_TOKENS = 256  # held-out tokens for the perplexity check (one forward per row)
PPL_LIMIT = 0.01  # rows whose perplexity moved by more than this fraction from fp32's are flagged
DEFAULT_IMPL = "attnlab default"  # generate(from_pretrained(...), ids, n): no precision, no preparation


@functools.cache
def held_out_ids(vocab_size: int, n_tokens: int = PPL_TOKENS) -> torch.Tensor:
    """(1, n_tokens) ids: the start of the default corpus's validation split, by the shipped tokenizer
    (ids beyond ``vocab_size`` wrap around: the random-weight shapes have other vocabularies)."""
    from attnlab.hub import load_tokenizer
    from attnlab.training.corpus import load_corpus

    tok = load_tokenizer("default")
    ids: list[int] = []
    for doc in load_corpus(max_files=300).documents["validation"]:
        ids += tok.encode(doc)
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        raise ValueError(f"the default corpus's validation split has {len(ids)} tokens, fewer than {n_tokens}")
    return torch.tensor([ids[:n_tokens]]) % vocab_size


@torch.inference_mode()
def perplexity(logits_fn, ids: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) of (1, T) ``ids`` under ``logits_fn`` ((1, T-1) ids -> logits)."""
    logits = logits_fn(ids[:, :-1]).float()  # (1, T-1, V)
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[0, 1:]).exp())


def bandwidth_probe(megabytes: int = 512, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s on a buffer far larger than the caches: the better of a copy
    (``dst.copy_(src)``, bytes read + written) and a read-only reduction (``src.sum()``, bytes read). The
    larger figure is the stricter denominator for the roofline fraction."""
    n = megabytes * (1 << 20) // 4
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)
    best_copy = best_read = float("inf")
    for _ in range(repeats):
        best_copy = min(best_copy, Stopwatch.call(lambda: dst.copy_(src))[0])
        best_read = min(best_read, Stopwatch.call(src.sum)[0])
    return max(2 * n * 4 / best_copy, n * 4 / best_read)


def hf_llama_from_attnlab(model, directory: Path) -> None:
    """Write an attnlab Llama-shaped decoder as a HF ``LlamaForCausalLM`` directory (same weights)."""
    import transformers

    from attnlab.interop.hf import LLAMA_NAMES, expand_pattern

    cfg = model.config
    if cfg.family != "decoder" or cfg.norm != "rms" or cfg.ffn != "swiglu" or cfg.position != "rope":
        raise ValueError("only Llama-shaped decoders (rms norm, swiglu, rope) can be exported to HF Llama")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.attn_qkv_bias)
    ours = model.state_dict()
    state = {hf_name: ours[name] for pattern, target in LLAMA_NAMES.items()
             for hf_name, name in expand_pattern(pattern, target, cfg) if name in ours}
    hf = transformers.LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"export to HF Llama failed: missing {missing[:4]}, unexpected {unexpected[:4]}")
    hf.save_pretrained(directory)


def _time_interleaved(runs: dict[str, object], new_tokens: int, repeats: int) -> dict[str, tuple]:
    """For each implementation: (best seconds for 1 token, best seconds for ``new_tokens``, its tokens).

    The implementations take turns within every repeat (a, b, c, a, b, c, ...), so that load from other
    processes on the machine hits them alike."""
    from tqdm.auto import tqdm

    progress = tqdm(total=len(runs) * (repeats + 1), desc="decode runs", unit="run", leave=False)
    for name, fn in runs.items():
        progress.set_postfix_str(f"warm-up {name}")
        fn(2)
        progress.update()
    best = {name: [float("inf"), float("inf"), None] for name in runs}
    best["bandwidth"] = [0.0]
    for _ in range(repeats):
        best["bandwidth"][0] = max(best["bandwidth"][0], bandwidth_probe(repeats=2))  # the probe takes turns too
        for name, fn in runs.items():
            progress.set_postfix_str(name)
            progress.update()
            best[name][0] = min(best[name][0], Stopwatch.call(lambda fn=fn: fn(1))[0])
            seconds, out = Stopwatch.call(lambda fn=fn: fn(new_tokens))
            best[name][1] = min(best[name][1], seconds)
            best[name][2] = out
    progress.close()
    return {name: tuple(v) for name, v in best.items()}


def run_setting(name: str, hf_dir: Path, *, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                compile_too: bool | str, bandwidth: float, seed: int = 0,
                precisions: tuple[str, ...] = PRECISIONS) -> list[dict]:
    import transformers

    import attnlab
    from attnlab.inference.fast import prepare_for_decode, weight_bytes

    base = attnlab.from_pretrained(hf_dir).eval()
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    text = held_out_ids(vocab)
    runs, meta, compiled_models, logits_fns = {}, {}, {}, {}
    default_model = attnlab.from_pretrained(hf_dir)  # what a user gets: no precision, no preparation

    def run_default(n: int) -> torch.Tensor:
        return attnlab.generate(default_model, ids, n)[:, prompt_len:]

    key = f"{DEFAULT_IMPL}|fp32"
    runs[key], meta[key], logits_fns[key] = run_default, weight_bytes(default_model), default_model
    for precision, dtype in HF_DTYPES.items():
        if precision != "fp32" and precision not in precisions:
            continue
        hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()

        def run_hf(n: int, hf=hf) -> torch.Tensor:
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=0)[:, prompt_len:]

        key = f"transformers {transformers.__version__}|{precision}"
        runs[key], meta[key], logits_fns[key] = run_hf, None, lambda x, hf=hf: hf(x).logits
    mode = {True: "static", False: None}.get(compile_too, compile_too)
    ours = list(dict.fromkeys(("fp32",) + tuple(precisions)))  # attnlab fp32 is the exactness reference
    variants = [(p, False) for p in ours] + ([(p, mode) for p in precisions] if mode else [])
    for precision, compiled in variants:
        model = prepare_for_decode(copy.deepcopy(base), precision=precision, compile=compiled or False)

        def run_ours(n: int, model=model) -> torch.Tensor:
            return attnlab.generate(model, ids, n)[:, prompt_len:]

        key = "attnlab" + (f" {compiled}" if compiled else "") + f"|{precision}"
        runs[key], meta[key], logits_fns[key] = run_ours, weight_bytes(model), model
        if compiled:
            seconds, _ = Stopwatch.call(lambda: run_ours(new_tokens))  # compiles every graph the timed runs use
            compiled_models[key] = (model, seconds)
    rows = []
    timings = _time_interleaved(runs, new_tokens, repeats)
    bandwidth = max(bandwidth, timings.pop("bandwidth")[0])
    for key, (t1, tn, out) in timings.items():
        impl, precision = key.split("|")
        decode = batch * (new_tokens - 1) / max(tn - t1, 1e-9)
        row = {"model": name, "impl": impl, "precision": precision, "batch": batch, "prompt": prompt_len,
               "prefill_tok_s": batch * prompt_len / t1, "decode_tok_s": decode, "tokens": out,
               "ppl": perplexity(logits_fns[key], text)}
        if meta[key] is not None:
            row["roofline"] = meta[key] * (decode / batch) / bandwidth
            row["bandwidth_GBps"] = bandwidth / 1e9
        if key in compiled_models:
            model, warmup = compiled_models[key]
            sd = model.static_decoder
            row["compile_s"] = sum(sd.stats.graphs.values()) if sd is not None else warmup
            if sd is not None and sd.failed:
                row["impl"] += " (fell back to eager)"
        rows.append(row)
    _judge(rows)
    return rows


def _judge(rows: list[dict]) -> None:
    """Fill same_tokens / agree / ppl_change / quality / speed-ups; a speed-up is reported only when the
    fp32 tokens of attnlab (prepared, and the default call) match HF's."""
    hf = {r["precision"]: r for r in rows if r["impl"].startswith("transformers")}
    ours32 = next(r for r in rows if r["impl"] == "attnlab" and r["precision"] == "fp32")
    default = next((r for r in rows if r["impl"] == DEFAULT_IMPL), ours32)
    exact = torch.equal(ours32["tokens"], hf["fp32"]["tokens"]) and torch.equal(default["tokens"], hf["fp32"]["tokens"])
    for r in rows:
        ref = hf["fp32"] if r["precision"] == "fp32" else ours32
        r["agree"] = float((r["tokens"] == ref["tokens"]).float().mean())
        r["ppl_change"] = r["ppl"] / ours32["ppl"] - 1.0
        r["quality"] = ("ok" if abs(r["ppl_change"]) <= PPL_LIMIT else
                        f"FLAG: perplexity {100 * r['ppl_change']:+.1f}% vs fp32 (limit {100 * PPL_LIMIT:.0f}%)")
        if r["impl"].startswith("attnlab"):
            r["same_tokens"] = torch.equal(r["tokens"], ref["tokens"])
            target = hf.get(r["precision"], hf.get("bf16"))  # int8 is compared with HF's best low precision
            r["vs_hf"] = ("outputs differ: not reported" if not exact else
                          r["decode_tok_s"] / target["decode_tok_s"] if target is not None else "n/a")
            r["vs_hf_fp32"] = (r["decode_tok_s"] / hf["fp32"]["decode_tok_s"]) if exact else "n/a"
    for r in rows:
        r.pop("tokens")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["model"], r["batch"], r["prompt"]) for r in rows})
    impls = sorted({(r["impl"], r["precision"]) for r in rows}, key=lambda x: (not x[0].startswith("trans"), x))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(settings)), 4))
    width = 0.8 / len(impls)
    for j, (impl, prec) in enumerate(impls):
        found = [next((r for r in rows if (r["model"], r["batch"], r["prompt"]) == s
                       and r["impl"] == impl and r["precision"] == prec), None) for s in settings]
        vals = [r["decode_tok_s"] if r is not None else 0.0 for r in found]
        xs = [i + j * width for i in range(len(settings))]
        bars = ax.bar(xs, vals, width,
                      label=f"{impl.split(' ')[0]}{' ' + impl.split(' ')[1] if impl.startswith('attnlab ') else ''} {prec}")
        for bar, x, v, r in zip(bars, xs, vals, found):
            if r is not None and r.get("quality", "ok") != "ok":  # perplexity moved by more than PPL_LIMIT
                bar.set_hatch("//")
                ax.text(x, v, "!", ha="center", va="bottom", color="red", fontweight="bold")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(settings))])
    ax.set_xticklabels([f"{m}\nbatch {b}, prompt {p}" for m, b, p in settings], fontsize=8)
    ax.set_ylabel("decode tokens/s (greedy)")
    ax.set_title("Decode speed, same weights: Hugging Face generate vs attnlab fast path\n"
                 f"(hatched, !: perplexity more than {100 * PPL_LIMIT:.0f}% off fp32's)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main(argv: list[str]) -> int:
    p = parser("attnlab bench decode", "Prefill/decode speed of attnlab's fast path vs Hugging Face generate, "
                                       "same weights, each precision, with the bandwidth roofline.")
    p.add_argument("--models", default="smollm2-135m,default",
                   help="comma-separated: smollm2-135m, tiny (random Llama shapes) and/or default (shipped target)")
    p.add_argument("--batches", default="1", help="comma-separated batch sizes (e.g. 1,8)")
    p.add_argument("--prompts", default="128", help="comma-separated prompt lengths (e.g. 128,2048)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    add_compile(p, help="also time attnlab compiled: static-shape decode graphs (the default), 'static-jit' "
                        "(torch.compile in this process) or 'dynamic'")
    p.add_argument("--precisions", type=precision_list(PRECISIONS), default=",".join(PRECISIONS),
                   help="comma-separated attnlab precisions to time (HF fp32 and attnlab fp32 always run; "
                        "float32/bfloat16 are accepted too)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write rows and machine info to this JSON file")
    p.add_argument("--plot", default=None, help="write a PNG bar chart here")
    args = p.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ValueError("this benchmark compares against Hugging Face transformers: pip install transformers") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.new_tokens < 2:
        raise ValueError("--new-tokens must be at least 2 (decode speed is measured after the first token)")
    bandwidth = bandwidth_probe()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            hf_dir = Path(tmp) / name
            if name in SHAPES:
                import transformers

                torch.manual_seed(0)
                transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPES[name])).save_pretrained(hf_dir)
            elif name == "default":
                import attnlab

                hf_llama_from_attnlab(attnlab.from_pretrained("default"), hf_dir)
            else:
                raise ValueError(f"unknown model {name!r} in --models; choose from {sorted(SHAPES)} or 'default'")
            context = json.loads((hf_dir / "config.json").read_text())["max_position_embeddings"]
            for batch in (int(b) for b in args.batches.split(",")):
                for prompt_len in (int(t) for t in args.prompts.split(",")):
                    if prompt_len + args.new_tokens > context:
                        print(f"skipped {name} prompt {prompt_len}: beyond its context of {context} tokens")
                        continue
                    rows += run_setting(name, hf_dir, batch=batch, prompt_len=prompt_len,
                                        new_tokens=args.new_tokens, repeats=args.repeats,
                                        compile_too=args.compile or False, bandwidth=bandwidth,
                                        precisions=args.precisions)
    info = machine() | {"copy_bandwidth_GBps": bandwidth / 1e9}
    print(f"machine: {info}")
    print(markdown_table(rows, ["model", "impl", "precision", "batch", "prompt", "prefill_tok_s", "decode_tok_s",
                                "roofline", "agree", "ppl", "ppl_change", "quality", "same_tokens", "vs_hf",
                                "vs_hf_fp32", "compile_s"]))
    flagged = [f"{r['model']} {r['impl']} {r['precision']}" for r in rows if r["quality"] != "ok"]
    if flagged:
        print(f"perplexity more than {100 * PPL_LIMIT:.0f}% off fp32's (speed bought with quality): "
              + ", ".join(flagged))
    write_json(args.json, {"machine": info, "rows": rows})
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    if any(r.get("vs_hf") == "outputs differ: not reported" for r in rows):
        print("attnlab fp32 and Hugging Face fp32 gave different tokens: no speed-up is reported")
        return 1
    return 0
