"""Helpers every benchmark shares: the machine description, timing, tables."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from attnlab.layers import cpu_kernels
from attnlab.layers.quant import native_bf16

T = TypeVar("T")


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


class Stopwatch:
    """The one wall clock of the benchmarks (``time.perf_counter``). It starts when made, or again on entering
    a ``with`` block; ``seconds`` is the time since, frozen when the block ends. ``Stopwatch.call(fn)`` times
    one call and returns (seconds, result)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.end: float | None = None

    def __enter__(self) -> Stopwatch:
        self.start, self.end = time.perf_counter(), None
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        return (time.perf_counter() if self.end is None else self.end) - self.start

    @classmethod
    def call(cls, fn: Callable[[], T]) -> tuple[float, T]:
        with cls() as clock:
            result = fn()
        return clock.seconds, result


def timed(fn: Callable[[], object], *, repeats: int = 3, warmup: int = 1) -> tuple[float, object]:
    """Best wall time over ``repeats`` runs after ``warmup`` runs; returns (seconds, last result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    best = float("inf")
    for _ in range(repeats):
        seconds, result = Stopwatch.call(fn)
        best = min(best, seconds)
    return best, result


def timed_pair(a: Callable[[], object], b: Callable[[], object], *, repeats: int = 3,
               warmup: int = 1) -> tuple[float, object, float, object]:
    """Best wall times of ``a`` and ``b`` run alternately (a, b, a, b, ...), so that load from other
    processes hits both alike. Returns (seconds_a, result_a, seconds_b, result_b)."""
    ra = rb = None
    for _ in range(warmup):
        ra, rb = a(), b()
    best_a = best_b = float("inf")
    for _ in range(repeats):
        seconds, ra = Stopwatch.call(a)
        best_a = min(best_a, seconds)
        seconds, rb = Stopwatch.call(b)
        best_b = min(best_b, seconds)
    return best_a, ra, best_b, rb


def markdown_table(rows: list[dict], columns: list[str] | tuple[str, ...]) -> str:
    """The one markdown table writer of the benchmarks: a row per dict, ``columns`` in order (a missing value is
    blank); floats to 3 significant digits (thousands separated from 1000 on), anything else as ``str``."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path | None, payload: dict) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
