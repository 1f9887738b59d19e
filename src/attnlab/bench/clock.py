"""The one clock of the benchmarks. Standard library only, so that a worker process can time its engine
without importing torch before the memory baseline it reports (``peer_worker``).

``now()`` is the moment on that clock, for stamping events inside one process (each streamed token);
``Stopwatch`` times a block or a call; ``timed`` and ``timed_pair`` keep the best of several runs. The
start-up probes (``startup``, ``compiled_start``) are the exception by design: they run as a fresh
interpreter that imports nothing before what it measures, and compare their moments with the parent's
launch moment, so they stamp ``time.time()`` (a clock shared across processes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def now() -> float:
    """The current moment of the benchmarks' clock (``time.perf_counter``), in seconds."""
    return time.perf_counter()


class Stopwatch:
    """A stopwatch on ``now()``. It starts when made, or again on entering
    a ``with`` block; ``seconds`` is the time since, frozen when the block ends. ``Stopwatch.call(fn)`` times
    one call and returns (seconds, result)."""

    def __init__(self) -> None:
        self.start = now()
        self.end: float | None = None

    def __enter__(self) -> Stopwatch:
        self.start, self.end = now(), None
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = now()

    @property
    def seconds(self) -> float:
        return (now() if self.end is None else self.end) - self.start

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
