"""Benchmarks: each module exposes ``main(argv) -> int`` and returns/prints rows; run as ``attnlab bench NAME``.

Speed and memory claims live here, measured side by side in one run, never in timed unit tests.
"""

from __future__ import annotations

import importlib

# name -> module implementing ``main(argv: list[str]) -> int``
BENCHES: dict[str, str] = {
    "decode": "attnlab.bench.decode",
    "attention": "attnlab.bench.attention",
    "ring": "attnlab.bench.ring",
    "speculative": "attnlab.bench.speculative",
    "rwkv": "attnlab.bench.rwkv",
    "norms": "attnlab.bench.norms",
    "infini": "attnlab.bench.infini",
    "gqa": "attnlab.bench.gqa",
    "precision": "attnlab.bench.precision",
    "translation": "attnlab.bench.translation",
    "linear": "attnlab.bench.linear",
    "faults": "attnlab.bench.faults",
    "gguf": "attnlab.bench.gguf",
    "peer": "attnlab.bench.peer",
    "quality": "attnlab.bench.quality",
    "startup": "attnlab.bench.startup",
    "compiled-start": "attnlab.bench.compiled_start",
}


def run_bench(name: str, argv: list[str]) -> int:
    if name not in BENCHES:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(sorted(BENCHES))}")
    return int(importlib.import_module(BENCHES[name]).main(argv) or 0)


def main(argv: list[str]) -> int:
    """``attnlab bench NAME [options]``."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: attnlab bench NAME [options]\nbenchmarks: {', '.join(sorted(BENCHES))}")
        return 0 if argv else 2
    return run_bench(argv[0], argv[1:])
