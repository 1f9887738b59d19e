"""``attnlab tour [--tiny | --quick] [--out DIR]``: the field guide's claims, each run as a measured experiment.

Every section states the claim, the knob, what was measured, a figure and a verdict computed from this
run's numbers against a stated threshold (``tour.verdict``); the report is written as ``DIR/report.md``
(+ PNGs), ``DIR/report.html`` (self-contained) and ``DIR/report.json``.

A section that raises is reported as ``failed`` (error type and message in the report, traceback on
stderr) and the tour exits with status 1 after writing the others' report. ``not available`` is reserved
for a documented optional component: a shipped model a section needs that is absent from the installation
(checked before the section runs, so a FileNotFoundError from a bug still counts as a failure).
"""

from __future__ import annotations

import os
import platform
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from attnlab.bench.clock import Stopwatch
from attnlab.commands.args import parser
from attnlab.tour import basics, decoding, infini, optimisations, rwkv, seq2seq
from attnlab.tour.common import seeds
from attnlab.tour.report import Section, write_html, write_json, write_markdown


@dataclass(frozen=True)
class Plan:
    key: str
    title: str
    fn: Callable[[Path, str, int], Section]  # (out_dir, mode, seed) -> Section
    needs: tuple[str, ...] = ()  # shipped models the section cannot run without
    one_thread: bool = False  # trains small models: one thread (spinning OpenMP threads stall on a busy machine)


def sections() -> list[Plan]:
    return [
        Plan("attention", "Multi-head attention with separate Q, K, V", basics.attention_maps, ("default",)),
        Plan("residual", "FFN and residual connections", basics.residuals, one_thread=True),
        Plan("seq2seq", "Encoder vs decoder vs encoder-decoder (cross-attention)", seq2seq.encoder_decoder,
             one_thread=True),
        Plan("batchnorm", "BatchNorm vs LayerNorm on variable-length batches", basics.batchnorm, one_thread=True),
        Plan("placement", "Pre-Norm vs Post-Norm (vs sandwich)", basics.placement, one_thread=True),
        Plan("gqa", "MHA vs GQA vs MQA: the KV cache and the quality", basics.kv_cache, one_thread=True),
        Plan("speculative", "Speculative decoding", optimisations.speculative, ("default", "default-draft")),
        Plan("fast", "Fast CPU decoding: fewer weight bytes per token", decoding.fast_decode, ("default",)),
        Plan("rwkv", "RWKV: attention as a recurrence", rwkv.rwkv, ("default",)),
        Plan("infini", "Infini-attention: bounded memory for unbounded input", infini.infini, one_thread=True),
        Plan("ring", "Ring attention across processes", optimisations.ring),
        Plan("flash", "FlashAttention: tiled, online softmax, O(N) memory", optimisations.flash),
    ]


def _missing_shipped(needs: tuple[str, ...]) -> str | None:
    from attnlab.hub import shipped_dir

    for name in needs:
        try:
            shipped_dir(name)
        except FileNotFoundError as exc:
            return str(exc)
    return None


def run_section(plan: Plan, out: Path, mode: str, seed: int) -> Section:
    """Run one section; ``failed`` (with the error) if it raises, ``not available`` if a shipped model is absent."""
    clock = Stopwatch()
    missing = _missing_shipped(plan.needs)
    if missing is not None:
        section = Section(plan.key, plan.title, "—", "—", verdict="not available", because=missing)
    else:
        torch.manual_seed(seed)
        threads = torch.get_num_threads()
        if plan.one_thread:
            torch.set_num_threads(1)
        try:
            section = plan.fn(out, mode, seed)
        except Exception as exc:  # noqa: BLE001 - reported as failed; the other sections' report is still written
            print(f"tour: section {plan.key!r} failed:", file=sys.stderr)
            traceback.print_exc()
            section = Section(plan.key, plan.title, "—", "—", verdict="failed",
                              because=f"{type(exc).__name__}: {exc}")
        finally:
            torch.set_num_threads(threads)
    section.seconds = clock.seconds
    return section


def main(argv: list[str]) -> int:
    from tqdm import tqdm

    p = parser("attnlab tour", "The field guide's claims, measured on this machine; writes a report. Exit status "
               "1 if a section failed (the report of the others is still written).")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small settings (a few minutes on 2 cores)")
    size.add_argument("--tiny", action="store_true",
                      help="smoke-test settings (tiny models, a few steps, 2 seeds, one thread; about a minute in all on "
                           "a quiet machine): every section runs and draws its figure, but verdicts at this size "
                           "are rarely conclusive")
    p.add_argument("--out", default="tour-out", help="output directory (default: tour-out)")
    p.add_argument("--seed", type=int, default=0, help="first seed (sections that repeat over seeds use seed, seed+1, ...)")
    known = [plan.key for plan in sections()]
    p.add_argument("--only", nargs="+", default=None, metavar="KEY", help=f"run only these sections: {', '.join(known)}")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        raise ValueError(f"unknown tour section(s) {', '.join(unknown)}; choose from: {', '.join(known)}")
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import attnlab

    header = {"attnlab": attnlab.__version__, "torch": torch.__version__, "python": platform.python_version(),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "cores": os.cpu_count(), "seed": args.seed, "mode": mode,
              "spread": (f"residual, batchnorm, placement and gqa repeat their training over {len(seeds(mode, 0))} "
                         f"seeds (attention's random-init control over {len(seeds(mode, 0, tiny=2, quick=3, full=5))}); "
                         "seq2seq's spread is over 4 disjoint test subsets, speculative's over prompts, fast's over "
                         "interleaved rounds; rwkv, infini, ring and flash hold single deterministic measurements "
                         "against stated thresholds" + (" (tiny mode: fewer seeds, verdicts rarely conclusive)"
                                                        if mode == "tiny" else ""))}
    plan = [s for s in sections() if args.only is None or s.key in args.only]
    results = []
    threads = torch.get_num_threads()
    if mode == "tiny":  # tiny models gain nothing from threads, and on a busy machine spinning threads stall
        torch.set_num_threads(1)
    try:
        bar = tqdm(plan, desc="tour", unit="section", disable=mode == "tiny")
        for item in bar:
            bar.set_postfix_str(item.key)
            section = run_section(item, out, mode, args.seed)
            results.append(section)
            bar.write(f"{section.title:<58} {section.verdict:<14} {section.seconds:6.1f} s  {section.because}")
    finally:
        torch.set_num_threads(threads)
    header["total_seconds"] = round(sum(s.seconds for s in results), 1)
    md, page = write_markdown(results, out, header), write_html(results, out, header)
    write_json(results, out, header)
    failed = [s.key for s in results if s.verdict == "failed"]
    print(f"\nreport: {page} and {md}")
    if failed:
        print(f"tour: {len(failed)} section(s) failed: {', '.join(failed)} (tracebacks above)", file=sys.stderr)
        return 1
    return 0
