"""``attnlab tour [--quick] [--out DIR]``: the field guide's claims, each run as a measured experiment.

Every section states the claim, the knob, what was measured, a figure and a verdict computed from this
run's numbers; the report is written as ``DIR/report.md`` (+ PNGs), ``DIR/report.html`` (self-contained)
and ``DIR/report.json``. A section whose capability (or shipped model) is missing says so, and the tour
still succeeds.
"""

from __future__ import annotations

import importlib
import platform
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from attnlab.cli import parser
from attnlab.tour.report import Section, write_html, write_json, write_markdown


def _sections() -> list[tuple[str, str, Callable | None]]:
    from attnlab.tour import basics, optimisations

    def optional(module: str, name: str) -> Callable | None:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None

    return [
        ("attention", "Multi-head attention with separate Q, K, V", basics.attention_maps),
        ("residual", "FFN and residual connections", basics.residuals),
        ("seq2seq", "Encoder vs decoder vs encoder-decoder (cross-attention)",
         optional("attnlab.tour.seq2seq", "encoder_decoder")),
        ("batchnorm", "BatchNorm vs LayerNorm on variable-length batches", basics.batchnorm),
        ("placement", "Pre-Norm vs Post-Norm (vs sandwich)", basics.placement),
        ("gqa", "MHA vs GQA vs MQA: the KV cache", basics.kv_cache),
        ("speculative", "Speculative decoding", optimisations.speculative),
        ("fast", "Fast CPU decoding: fewer weight bytes per token", optional("attnlab.tour.decoding", "fast_decode")),
        ("rwkv", "RWKV: attention as a recurrence", optional("attnlab.tour.rwkv", "rwkv")),
        ("infini", "Infini-attention: bounded memory for unbounded input", optional("attnlab.tour.infini", "infini")),
        ("ring", "Ring attention across processes", optimisations.ring),
        ("flash", "FlashAttention: tiled, online softmax, O(N) memory", optimisations.flash),
    ]


def run_section(key: str, title: str, fn: Callable | None, out: Path, quick: bool, seed: int) -> Section:
    start = time.perf_counter()
    if fn is None:
        section = Section(key, title, "—", "—", verdict="not available",
                          because="this capability has not landed in this version of attnlab")
    else:
        torch.manual_seed(seed)
        try:
            section = fn(out, quick, seed)
        except FileNotFoundError as exc:  # a shipped model this section needs is absent
            section = Section(key, title, "—", "—", verdict="not available", because=str(exc).split(";")[0])
        except Exception as exc:  # noqa: BLE001 - one failing experiment must not lose the others' report
            traceback.print_exc()
            section = Section(key, title, "—", "—", verdict="not available",
                              because=f"the experiment failed in this run: {type(exc).__name__}: {exc}")
    section.seconds = time.perf_counter() - start
    return section


def main(argv: list[str]) -> int:
    from tqdm import tqdm

    p = parser("attnlab tour", "The field guide's claims, measured on this machine; writes a report.")
    p.add_argument("--quick", action="store_true", help="small settings (a few minutes on 2 cores)")
    p.add_argument("--out", default="tour-out", help="output directory (default: tour-out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", default=None, help="run only these sections (keys)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import attnlab

    header = {"attnlab": attnlab.__version__, "torch": torch.__version__, "python": platform.python_version(),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "cores": __import__("os").cpu_count(), "seed": args.seed, "mode": "quick" if args.quick else "full"}
    plan = [s for s in _sections() if args.only is None or s[0] in args.only]
    sections = []
    bar = tqdm(plan, desc="tour", unit="section")
    for key, title, fn in bar:
        bar.set_postfix_str(key)
        section = run_section(key, title, fn, out, args.quick, args.seed)
        sections.append(section)
        bar.write(f"{section.title:<58} {section.verdict:<14} {section.because}")
    header["total_seconds"] = round(sum(s.seconds for s in sections), 1)
    md, page = write_markdown(sections, out, header), write_html(sections, out, header)
    write_json(sections, out, header)
    print(f"\nreport: {page} and {md}")
    return 0
