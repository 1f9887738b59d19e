"""Quality beside speed for ``attnlab bench peer --quality`` / ``attnlab bench quality``: each row's perplexity
on held-out text, its change from attnlab fp32's, and from llama.cpp's at the same format.

Issue 27's targets: 8-bit within +1% of fp32, 4-bit within +5% and no worse than llama.cpp's same format.
Each row runs in a fresh process (``peer_worker``, ``mode = "quality"``): llama.cpp with ``logits_all``,
attnlab's compiled rows prepared at their precision without compiling (the same kernels, the eager graph),
Hugging Face fp32. One forward over each whole text; the log-softmax is computed the same way (float64)
for every engine.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from attnlab.bench.peer_worker import perplexity_from_logits as perplexity_from_logits  # re-exported

LIMITS = {"Q8_0": 0.01, "Q4_1": 0.05}  # allowed perplexity increase over fp32 at a format (issue 27)
QUALITY_COLUMNS = [("label", "engine"), ("precision", "precision"), ("format", "format"),
                   ("ppl_corpus validation", "ppl corpus"), ("ppl_change_corpus validation", "vs attnlab fp32"),
                   ("ppl_vs_llama_corpus validation", "vs llama.cpp"),
                   ("ppl_chat transcript", "ppl chat"), ("ppl_change_chat transcript", "vs attnlab fp32"),
                   ("ppl_vs_llama_chat transcript", "vs llama.cpp"), ("quality", "quality")]


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%" if abs(x) >= 5e-5 else "+0.00%"  # no '-0.00%' for identical figures


def judge(rows: list[dict]) -> None:
    """Fill the change columns from each row's ``ppl`` {text: perplexity}, and the ``quality`` verdict."""
    ref = next((r for r in rows if r["engine"] == "attnlab" and r["precision"] == "fp32" and r.get("ppl")), None)
    peer = {r["format"]: r for r in rows if r["engine"] == "llama.cpp" and r.get("ppl")}
    for r in rows:
        if not r.get("ppl"):
            continue
        verdicts = []
        for text, value in r["ppl"].items():
            r[f"ppl_{text}"] = value
            if ref is not None:
                change = value / ref["ppl"][text] - 1
                r[f"ppl_change_{text}"] = _pct(change)
                limit = LIMITS.get(r["format"])
                if limit is not None and change > limit:
                    verdicts.append(f"{text}: {_pct(change)} vs fp32 (limit +{100 * limit:.0f}%)")
            other = peer.get(r["format"])
            if other is not None and other is not r and r["engine"] != "llama.cpp":
                vs = value / other["ppl"][text] - 1
                r[f"ppl_vs_llama_{text}"] = _pct(vs)
                if r["format"] == "Q4_1" and vs > 0:
                    verdicts.append(f"{text}: worse than llama.cpp {r['format']}")
        r["quality"] = "; ".join(verdicts) or "ok"


def quality_rows(rows: list[dict], run: Callable[[dict], dict]) -> None:
    """Run each row's quality process (``run(row) -> worker result``) and judge them all."""
    from tqdm.auto import tqdm

    for row in tqdm(rows, desc="perplexity", unit="process"):
        result = run(row)
        if "error" in result:
            row["quality_failed"] = result["error"]
            print(f"perplexity of {row['key']} failed: {result['error']}", file=sys.stderr)
            continue
        row["ppl"] = result["ppl"]
    judge(rows)
