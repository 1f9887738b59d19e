"""``attnlab bench peer``: SmolLM2-135M-Instruct decoded by llama.cpp and by attnlab (and Hugging Face fp32)
side by side, at each weight format, on identical token ids.

    make peer                                   # llama-cpp-python built with CMAKE_ARGS="-DGGML_NATIVE=OFF"
    attnlab bench peer --rounds 3 --new-tokens 128 --threads 2 --out runs/peer
    attnlab bench peer --quality                # + perplexity of each row (or: attnlab bench quality)

What runs (each row in a fresh process of its own, ``bench/peer_worker.py``):

- llama.cpp (llama-cpp-python, ``n_threads``) on the shipped GGUF (Q4_1) and on its F32 / BF16 / F16 / Q8_0
  siblings, written once by llama.cpp's own quantizer (``bench/peer_files.py``);
- ``attnlab default``: ``attnlab.generate`` on ``from_pretrained(shipped GGUF)`` — the call a user writes;
- ``attnlab compiled``: ``prepare_for_decode(precision=p, compile=True)`` for every p of
  ``inference.fast.PRECISIONS`` (a precision added there is picked up with no change here), paired with
  the llama.cpp format of the same width (fp32-F32, bf16-BF16, fp16-F16, int8/q8_0-Q8_0, 4-bit-Q4_1);
  a llama.cpp format no attnlab precision can run yet is a row of '—' saying why;
- ``transformers`` fp32 on the shipped GGUF, the third reference.

Rounds are interleaved (round 1: every row, round 2: every row, ... in an order rotated each round) and each
figure is the median over rounds. Every process gets the same ids: the chat prompt rendered by the tokenizer's
chat template (43 tokens) and, for prefill, 512 tokens of the default corpus's validation split. Greedy,
``--new-tokens`` tokens, end-of-text ignored. Per row: decode tok/s, prefill ms (short and long prompt),
weights GB/s (bytes one decode step reads x tok/s), resident memory after warm-up and the import baseline
(RSS after importing the library, before loading), load s, first generation s (warm-up, compile included),
attnlab / llama.cpp ratios at the same format, and the first position where each pair of rows' tokens
differ. A run during which other processes used more than 5% of the machine (/proc/stat minus the child's
own CPU time) is flagged. The CPU's model name, ISA flags and the date go into the result.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from attnlab.bench import peer_report as rep
from attnlab.bench.common import markdown_table

PROMPT = "Explain in a few sentences why the sky is blue during the day"  # 43 ids with SmolLM2's template
LONG_PROMPT_TOKENS = 512
QUALITY_TOKENS = 512  # held-out tokens of the corpus text whose perplexity is measured
FORMATS = ("F32", "BF16", "F16", "Q8_0", "Q4_1")  # llama.cpp formats; Q4_1 is the shipped file
SHIPPED_FORMAT = "Q4_1"
INSTALL = ("bench peer compares against llama.cpp through llama-cpp-python, which is not installed: run "
           "`make peer` (builds it from source with CMAKE_ARGS=\"-DGGML_NATIVE=OFF\"), or "
           "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install -e '.[peer]'")
NOT_YET = {  # why a format has no attnlab row: none of the precisions available runs it
    "F16": "no fp16 decode precision in attnlab (inference.fast.PRECISIONS)",
    "Q8_0": "no 8-bit precision among those available",
    "Q4_1": "no 4-bit precision among those available",
    "BF16": "no bf16 precision among those available",
    "F32": "no fp32 precision among those available",
}


def format_of(precision: str) -> str | None:
    """The llama.cpp format an attnlab precision is compared with (same bits per weight), or None."""
    p = precision.lower()
    if p.startswith("native-"):  # a sibling file loaded as stored, e.g. native-q8_0
        return p.removeprefix("native-").upper()
    known = {"fp32": "F32", "bf16": "BF16", "fp16": "F16", "int8": "Q8_0", "q8_0": "Q8_0", "q8": "Q8_0",
             "native": SHIPPED_FORMAT}
    if p in known:
        return known[p]
    if p.startswith("q4") or p in ("int4", "4bit"):
        return "Q4_1"
    return None


def require_llama_cpp() -> None:
    """One clear line (ValueError -> ``error: ...``, exit 2) when the ``[peer]`` extra is missing."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise ValueError(INSTALL)


def attnlab_precisions() -> tuple[str, ...]:
    """Every conversion precision, then the GGUFs loaded as stored: the shipped Q4_1 (``native``) and the Q8_0
    sibling (``native-q8_0``), the same bytes llama.cpp multiplies."""
    from attnlab.inference.fast import NATIVE, PRECISIONS

    return (*PRECISIONS, NATIVE, f"{NATIVE}-q8_0")


def plan_rows(formats: list[str], precisions: tuple[str, ...], available: tuple[str, ...], *, hf: bool,
              default: bool) -> list[dict]:
    """Every row to run (``engine``, ``variant``, ``precision``, ``format``): llama.cpp at ``formats``, attnlab
    compiled at ``precisions``, and a '—' row with the reason for a format no precision of ``available``
    (``inference.fast.PRECISIONS``) can run."""
    rows = [{"engine": "llama.cpp", "variant": "", "precision": f, "format": f} for f in formats]
    if default:
        rows.append({"engine": "attnlab", "variant": "default", "precision": "fp32", "format": "F32"})
    covered = set()
    for p in precisions:
        f = format_of(p)
        if f is None:
            continue
        covered.add(f)
        rows.append({"engine": "attnlab", "variant": "compiled", "precision": p, "format": f})
    possible = {format_of(p) for p in available}
    for f in formats:
        if f not in covered and f not in possible:
            rows.append({"engine": "attnlab", "variant": "compiled", "precision": "—", "format": f,
                         "skipped": NOT_YET.get(f, f"no attnlab precision runs {f} yet")})
    if hf:
        rows.append({"engine": "transformers", "variant": "", "precision": "fp32", "format": "F32"})
    seen: set[tuple[str, str]] = set()
    for r in rows:
        r["label"] = " ".join(x for x in (r["engine"], r["variant"]) if x)
        r["key"] = f"{r['label']} {r['precision']}"
        # the plot's series: the engine, or engine + precision for a second precision at the same format
        r["series"] = r["label"] if (r["label"], r["format"]) not in seen else r["key"]
        seen.add((r["label"], r["format"]))
    return rows


def prompts(tokenizer, long_tokens: int = LONG_PROMPT_TOKENS,
            quality_tokens: int = QUALITY_TOKENS) -> tuple[list[int], list[int], dict[str, list[int]]]:
    """(chat prompt ids, long prompt ids, held-out texts for perplexity {name: ids}): the long prompt is the
    start of the validation split, the perplexity text the ``quality_tokens`` after it."""
    from attnlab.bench.peer_texts import chat_transcript, validation_ids
    from attnlab.chat import render_chat

    text = render_chat(tokenizer.chat_template, [{"role": "user", "content": PROMPT}],
                       bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    held = validation_ids(tokenizer, long_tokens + quality_tokens)
    return tokenizer.encode(text), held[:long_tokens], {"corpus validation": held[long_tokens:],
                                                          "chat transcript": chat_transcript(tokenizer)}


def run_worker(spec: dict, workdir: Path, timeout: float) -> dict:
    """Run one row in a fresh process; its result plus the share of the machine others used meanwhile."""
    spec_path, out_path = workdir / "spec.json", workdir / "out.json"
    out_path.unlink(missing_ok=True)
    rep.write_atomic(spec_path, json.dumps(spec))
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_before = usage.ru_utime + usage.ru_stime
    parent_before = sum(os.times()[:2])
    before = rep.read_cpu_times()
    done = subprocess.run([sys.executable, "-m", "attnlab.bench.peer_worker", str(spec_path), str(out_path)],
                          capture_output=True, text=True, timeout=timeout)
    after = rep.read_cpu_times()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = usage.ru_utime + usage.ru_stime - own_before + sum(os.times()[:2]) - parent_before
    if done.returncode != 0 or not out_path.exists():
        tail = "\n".join(done.stderr.strip().splitlines()[-6:])
        return {"error": f"exit {done.returncode}: {tail}"}
    result = json.loads(out_path.read_text())
    result["others_share"] = rep.others_share(before, after, own)
    return result


def summarise(row: dict, runs: list[dict], new_tokens: int) -> None:
    """Medians over rounds into ``row`` (MB, ms, GB/s), the busiest round's share and a determinism check."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        row["skipped"] = row["failed"] = runs[0]["error"] if runs else "did not run"
        return
    mb = 1 / 2 ** 20
    med = lambda key: rep.median([r[key] for r in ok if key in r])  # noqa: E731
    row.update(
        decode_tok_s=med("decode_tok_s"), prefill_ms=1e3 * med("prefill_s"), prefill_long_ms=1e3 * med("prefill_long_s"),
        weights_GBps=med("weight_bytes") * med("decode_tok_s") / 1e9, rss_MB=med("rss_bytes") * mb,
        import_MB=med("rss_import_bytes") * mb, load_s=med("load_s"), first_gen_s=med("first_gen_s"),
        busiest=max(r["others_share"] for r in ok), rounds=len(ok), tokens=ok[0]["tokens"])
    row["above_import_MB"] = row["rss_MB"] - row["import_MB"]
    row["busy"] = rep.busy_flag(row["busiest"])
    if any(r["tokens"] != ok[0]["tokens"] for r in ok):
        row["note"] = "tokens differ between rounds"
    if len(ok) < len(runs):
        row["note"] = f"{len(runs) - len(ok)} round(s) failed: " + next(r["error"] for r in runs if "error" in r)


def ratios(rows: list[dict]) -> None:
    """attnlab / llama.cpp at the same format: decode speed (>1 is faster), prefill time and memory above
    the import baseline (<1 is less)."""
    peer = {r["format"]: r for r in rows if r["engine"] == "llama.cpp" and "decode_tok_s" in r}
    for r in rows:
        ref = peer.get(r["format"])
        if r["engine"] != "attnlab" or ref is None or "decode_tok_s" not in r:
            continue
        r["decode_vs_llama"] = r["decode_tok_s"] / ref["decode_tok_s"]
        r["prefill_vs_llama"] = r["prefill_ms"] / ref["prefill_ms"]
        r["prefill_long_vs_llama"] = r["prefill_long_ms"] / ref["prefill_long_ms"]
        r["memory_vs_llama"] = r["above_import_MB"] / ref["above_import_MB"]
        diff = rep.first_difference(r["tokens"], ref["tokens"])
        r["first_diff_vs_llama"] = "identical" if diff is None else diff


COLUMNS = [("label", "engine"), ("precision", "precision"), ("format", "format"), ("decode_tok_s", "decode tok/s"),
           ("decode_vs_llama", "decode vs llama.cpp"), ("prefill_ms", "prefill ms (short)"),
           ("prefill_long_ms", "prefill ms (long)"), ("prefill_vs_llama", "prefill time vs llama.cpp (short)"),
           ("prefill_long_vs_llama", "(long)"), ("weights_GBps", "weights GB/s"), ("rss_MB", "resident MB"),
           ("import_MB", "import baseline MB"), ("above_import_MB", "above baseline MB"),
           ("memory_vs_llama", "memory vs llama.cpp"), ("load_s", "load s"), ("first_gen_s", "first generation s"),
           ("first_diff_vs_llama", "first token differing from llama.cpp"), ("busy", "busy machine"),
           ("skipped", "not run because"), ("note", "note")]


def main(argv: list[str]) -> int:
    from attnlab.commands.args import parser

    p = parser("attnlab bench peer", "llama.cpp vs attnlab (vs Hugging Face fp32) on SmolLM2's GGUF, same token ids.")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is their median")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per generation")
    p.add_argument("--threads", type=int, default=2, help="threads of every engine")
    p.add_argument("--long-prompt", type=int, default=LONG_PROMPT_TOKENS, help="tokens of the long (prefill) prompt")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"llama.cpp formats (of {', '.join(FORMATS)})")
    p.add_argument("--precisions", default=None, help="attnlab precisions of the compiled rows (default: all of "
                                                       "inference.fast.PRECISIONS; '' for none)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face transformers fp32 row")
    p.add_argument("--no-default", action="store_true", help="skip the `attnlab default` row")
    p.add_argument("--quality", action="store_true", help="also the perplexity of each row on held-out text")
    p.add_argument("--quality-tokens", type=int, default=QUALITY_TOKENS,
                   help="tokens of the validation-split text whose perplexity --quality measures")
    p.add_argument("--quality-only", action="store_true", help=argparse_hidden())
    p.add_argument("--timeout", type=float, default=1800, help="seconds one process may take")
    p.add_argument("--out", default="runs/bench-peer", help="writes OUT.json, OUT.md and OUT.png")
    args = p.parse_args(argv)
    require_llama_cpp()
    if min(args.rounds, args.threads) < 1 or min(args.new_tokens, args.long_prompt, args.quality_tokens) < 2:
        raise ValueError("--rounds and --threads must be >= 1; --new-tokens, --long-prompt and --quality-tokens "
                         ">= 2")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"--formats {args.formats!r}: choose from {', '.join(FORMATS)}")
    available = attnlab_precisions()
    precisions = available if args.precisions is None else tuple(x.strip() for x in args.precisions.split(",") if x.strip())
    unknown = [x for x in precisions if x not in available]
    if unknown:
        raise ValueError(f"--precisions: {unknown} not in inference.fast.PRECISIONS ({', '.join(available)})")
    if not args.no_hf and importlib.util.find_spec("transformers") is None:
        raise ValueError("the Hugging Face row needs transformers: pip install -e '.[dev]', or pass --no-hf")

    from tqdm.auto import tqdm

    from attnlab.bench.peer_files import llama_quantizer, write_siblings
    from attnlab.hub import find_shipped_gguf, load_tokenizer

    source = find_shipped_gguf("smollm2")
    quantize, version = llama_quantizer(args.threads)
    native_files = [format_of(p) for p in precisions if p.startswith("native")]  # attnlab reads these as stored
    wanted = [f for f in dict.fromkeys([*formats, *native_files]) if f != SHIPPED_FORMAT]
    files = write_siblings(source, wanted, quantize=quantize,
                           quantizer_version=version, progress=lambda m: print(m, file=sys.stderr))
    files[SHIPPED_FORMAT] = source
    short, long, texts = prompts(load_tokenizer(source), args.long_prompt, args.quality_tokens)
    rows = plan_rows(formats, precisions, available, hf=not args.no_hf, default=not args.no_default)
    runnable = [r for r in rows if "skipped" not in r]
    context = max(len(long) + args.new_tokens, len(short) + args.new_tokens, *map(len, texts.values())) + 16
    base = dict(threads=args.threads, context=context, prompt=short, long_prompt=long, new_tokens=args.new_tokens,
                texts=texts)

    def spec(row: dict, mode: str) -> dict:
        native = row["precision"].startswith("native")
        model = files[row["format"]] if row["engine"] == "llama.cpp" or native else source
        return {**base, **{k: row[k] for k in ("engine", "variant", "precision")}, "model": str(model), "mode": mode}

    runs: dict[str, list[dict]] = {r["key"]: [] for r in runnable}
    with tempfile.TemporaryDirectory(prefix="attnlab-peer-") as tmp:
        if not args.quality_only:
            progress = tqdm(total=args.rounds * len(runnable), desc="bench peer", unit="process")
            for round_ in range(args.rounds):
                shift = round_ % len(runnable)
                for row in runnable[shift:] + runnable[:shift]:  # interleaved, rotated each round
                    progress.set_postfix_str(f"round {round_ + 1}: {row['key']}")
                    runs[row["key"]].append(run_worker(spec(row, "time"), Path(tmp), args.timeout))
                    progress.update()
            progress.close()
            for row in runnable:
                summarise(row, runs[row["key"]], args.new_tokens)
            ratios(rows)
        if args.quality or args.quality_only:
            from attnlab.bench.peer_quality import quality_rows

            quality_rows(runnable, lambda row: run_worker(spec(row, "quality"), Path(tmp), args.timeout))
    return report(rows, args, argv, short, long, texts, version, quality=args.quality or args.quality_only,
                  timing=not args.quality_only)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def report(rows: list[dict], args, argv: list[str], short: list[int], long: list[int], texts: dict, version: str,
           *, quality: bool, timing: bool) -> int:
    """Print and write (atomically) the JSON, markdown and PNG of a run."""
    import platform

    import torch

    from attnlab.bench.peer_quality import QUALITY_COLUMNS

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = rep.cpu_description() | {"date": when, "llama_cpp": version, "torch": torch.__version__,
                                       "python": platform.python_version()}
    tokens = {r["key"]: r["tokens"] for r in rows if r.get("tokens") is not None}
    command = (["attnlab", "bench", "quality", *argv[3:]] if argv[:3] == ["--quality-only", "--rounds", "1"]
               else ["attnlab", "bench", "peer", *argv])  # bench quality calls main with those three first
    settings = {"command": shlex.join(command),
                "rounds": args.rounds, "new_tokens": args.new_tokens, "threads": args.threads,
                "prompt": PROMPT, "prompt_tokens": len(short), "long_prompt_tokens": len(long),
                "quality_tokens": {k: len(v) for k, v in texts.items()}}
    payload = {"machine": machine, "settings": settings, "rows": rows, "first_difference": rep.difference_matrix(tokens)}
    head = (f"SmolLM2-135M-Instruct, {machine['cpu']} ({', '.join(machine['isa']) or 'no AVX2'}), {machine['cores']} "
            f"cores, {when}; {args.threads} threads" + (
                f", {len(short)}-token chat prompt, {len(long)}-token prefill prompt, {args.new_tokens} greedy tokens, "
                f"median of {args.rounds} interleaved round(s)" if timing else "") + f"; {version}")
    parts = [f"# attnlab bench peer\n\n{head}\n\n`{settings['command']}`\n"]
    if timing:
        parts.append(markdown_table(rows, COLUMNS, missing="—"))
        busy = [r["key"] for r in rows if r.get("busy")]
        if busy:
            parts.append(f"\n**Busy machine**: other processes used more than {100 * rep.BUSY_LIMIT:.0f}% of the CPU "
                         f"during {', '.join(busy)}: these figures are not a measurement.")
        keys = list(tokens)
        if keys:
            matrix = [{"row": a, **{b: ("=" if payload["first_difference"][a].get(b) is None
                                        else payload["first_difference"][a][b]) for b in keys if b != a}} for a in keys]
            parts.append("\nFirst position where the greedy tokens of two rows differ (= : identical for all "
                         f"{args.new_tokens}):\n\n" + markdown_table(matrix, [("row", "")] + [(k, k) for k in keys], missing="—"))
    if quality:
        parts.append("\nPerplexity on held-out text (lower is better; change vs attnlab fp32 / vs llama.cpp at the "
                     "same format):\n\n" + markdown_table(rows, QUALITY_COLUMNS, missing="—"))
    text = "\n".join(parts) + "\n"
    print(text)
    out = Path(args.out)
    rep.write_json_atomic(out.with_suffix(".json"), payload)
    rep.write_atomic(out.with_suffix(".md"), text)
    written = [out.with_suffix(".json"), out.with_suffix(".md")]
    if timing and any(r.get("decode_tok_s") is not None for r in rows):
        written.append(rep.plot(rows, out.with_suffix(".png"), head))
    print("wrote " + ", ".join(map(str, written)))
    failed = [r["key"] for r in rows if r.get("failed") or r.get("quality_failed")]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
