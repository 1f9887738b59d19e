"""Helpers every benchmark shares: the machine description, peak memory, tables, JSON output (the clock is
``clock.py``)."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
from collections.abc import Sequence
from pathlib import Path

import torch

from attnlab.atomic import atomic_write_text
from attnlab.layers import cpu_kernels
from attnlab.layers.quant import native_bf16


def machine() -> dict:
    """What the numbers were measured on (recorded with every result)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(),
        "attnlab_kernel": cpu_kernels.available(),
    }


def peak_rss_bytes() -> int:
    """This process's peak resident set since the last ``reset_peak_rss`` (since start where that is unsupported)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_rss() -> None:
    """Restart the peak from the current resident set (Linux: writing 5 to clear_refs resets VmHWM), so that
    a peak reached earlier (importing, building inputs) cannot hide or inflate the one being measured."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def markdown_table(rows: list[dict], columns: Sequence[str | tuple[str, str]], *, missing: str = "") -> str:
    """The one markdown table writer of the benchmarks and the tour: a row per dict, ``columns`` in order, each
    a key (its own header) or a (key, header) pair. A value that is None or absent prints as ``missing``;
    floats to 3 significant digits (thousands unrounded, separated, from 1000 on); anything else as ``str``,
    with ``|`` written as ``/`` so that a cell cannot split the row."""
    pairs = [(c, c) if isinstance(c, str) else c for c in columns]

    def cell(v: object) -> str:
        if v is None:
            return missing
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v).replace("|", "/")

    lines = ["| " + " | ".join(h for _, h in pairs) + " |", "|" + "---|" * len(pairs)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in pairs) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path | None, payload: dict) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")  # a crash never leaves half a result file
