"""What every tour section shares: the run's size (``tiny`` / ``quick`` / ``full``), the seeds it trains with,
and figure saving."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from attnlab.figures import save_figure

MODES = ("tiny", "quick", "full")
T = TypeVar("T")


def pick(mode: str, *, tiny: T, quick: T, full: T) -> T:
    """The setting for this run's mode."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    return {"tiny": tiny, "quick": quick, "full": full}[mode]


def seeds(mode: str, seed: int, *, tiny: int = 2, quick: int = 3, full: int = 3) -> list[int]:
    """The seeds a section repeats its experiment over (the spread between them is the verdict's noise)."""
    return [seed + i for i in range(pick(mode, tiny=tiny, quick=quick, full=full))]


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def save(fig, out: Path, name: str) -> str:
    """Write ``fig`` as ``out/name`` (PNG) and close it; returns the file name for the report."""
    fig.tight_layout()
    save_figure(fig, out / name)
    return name
