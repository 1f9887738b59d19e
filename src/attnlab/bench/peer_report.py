"""The pure parts of ``attnlab bench peer``: where two engines' tokens part, how busy the machine was, the
CPU's name and ISA, medians, and the JSON / markdown / PNG it writes (each written atomically)."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path

from attnlab.atomic import atomic_write_file, atomic_write_text
from attnlab.figures import save_figure

BUSY_LIMIT = 0.05  # a run during which other processes used more than this share of the machine is flagged
ISA_FLAG = re.compile(r"^(avx2|avx512\w*|avx_vnni\w*|\w*vnni\w*|\w*bf16\w*|amx\w*|f16c|fma)$")


# ----------------------------------------------------------------------------- tokens
def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where ``a`` and ``b`` differ (a missing token counts as a difference),
    or None when they are identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def difference_matrix(tokens: dict[str, Sequence[int]]) -> dict[str, dict[str, int | None]]:
    """{row: {other row: first difference or None}} over every pair of rows that produced tokens."""
    return {a: {b: first_difference(ta, tb) for b, tb in tokens.items() if b != a} for a, ta in tokens.items()}


# ----------------------------------------------------------------------------- busy machine
def cpu_times(stat_text: str) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from the text of /proc/stat ("cpu  user nice system idle iowait irq
    softirq steal guest guest_nice"); idle + iowait are idle, guest time is already counted in user/nice."""
    fields = stat_text.splitlines()[0].split()
    if fields[0] != "cpu":
        raise ValueError("the first line of /proc/stat is not the all-CPU line")
    values = [int(v) for v in fields[1:9]] + [0] * max(0, 9 - len(fields))
    total = sum(values[:8])
    return total - values[3] - values[4], total


def read_cpu_times(path: str = "/proc/stat") -> tuple[int, int]:
    return cpu_times(Path(path).read_text())


def others_share(before: tuple[int, int], after: tuple[int, int], own_cpu_s: float,
                 clock_ticks: int | None = None) -> float:
    """Share of the whole machine's CPU time (all cores) between two /proc/stat samples that processes other
    than ours used: (busy jiffies - our CPU seconds x ticks/s) / total jiffies, clamped at 0."""
    ticks = clock_ticks or os.sysconf("SC_CLK_TCK")
    busy, total = after[0] - before[0], after[1] - before[1]
    if total <= 0:
        return 0.0
    return max(0.0, (busy - own_cpu_s * ticks) / total)


def busy_flag(share: float, limit: float = BUSY_LIMIT) -> str:
    return f"BUSY: others used {100 * share:.0f}% of the machine" if share > limit else ""


# ----------------------------------------------------------------------------- machine
def cpu_description(lscpu_text: str | None = None) -> dict:
    """The CPU's model name and the ISA flags that decide the kernels (avx2, avx512*, vnni, bf16, amx)."""
    if lscpu_text is None:
        try:
            lscpu_text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            lscpu_text = ""
    fields = dict(line.split(":", 1) for line in lscpu_text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    model, flags = fields.get("Model name", ""), fields.get("Flags", "").split()
    if not model or not flags:  # no lscpu: /proc/cpuinfo
        info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        model = model or next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
        flags = flags or next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return {"cpu": model, "isa": sorted(f for f in set(flags) if ISA_FLAG.match(f)), "cores": os.cpu_count()}


def median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------- output
def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through the atomic writer (a temporary name beside it, then a
    rename): a reader or a crash never sees half a file; the directory is made if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        return atomic_write_file(path, lambda tmp: tmp.write_bytes(data))
    return atomic_write_text(path, data)


def write_json_atomic(path: str | Path, payload: dict) -> Path:
    return write_atomic(path, json.dumps(payload, indent=2) + "\n")


def plot(rows: list[dict], path: str | Path, title: str) -> Path:
    """Small multiples, one bar group per format: decode tok/s, and resident memory above the import
    baseline, for each engine; rows that did not run are absent from their group."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    formats = list(dict.fromkeys(r["format"] for r in rows))
    series = list(dict.fromkeys(r["series"] for r in rows if r.get("decode_tok_s") is not None))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.4 * len(formats)), 4))
    width = 0.8 / max(len(series), 1)
    for ax, key, ylabel in ((axes[0], "decode_tok_s", "decode tokens/s"),
                            (axes[1], "above_import_MB", "resident MB above import baseline")):
        for j, label in enumerate(series):
            xs, ys = [], []
            for i, f in enumerate(formats):
                row = next((r for r in rows if r["series"] == label and r["format"] == f and r.get(key) is not None), None)
                if row is not None:
                    xs.append(i + j * width)
                    ys.append(row[key])
            ax.bar(xs, ys, width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(formats))])
        ax.set_xticklabels(formats)
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 140), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
