"""Writing figures: every PNG the package makes (benchmarks, the tour, the trainer's loss curve) is rendered
in memory and written through the atomic writer (``atomic.py``), so a crash while saving never leaves half an
image in place of the previous one."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from attnlab.atomic import atomic_write_file


def save_figure(fig: Any, path: str | Path, *, dpi: int = 110, close: bool = True) -> Path:
    """Render the matplotlib figure ``fig`` as PNG at ``path`` (its directory made if missing); close it unless
    ``close=False``. Returns ``path``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = buffer.getvalue()
    return atomic_write_file(path, lambda tmp: tmp.write_bytes(data))
