"""What every command's flags share: a parser whose mistakes are one ``error:`` line, and one precision
vocabulary.

Precisions are named the same way in every command: ``fp32``, ``bf16``, ``fp16``, ``int8`` (int8 weights
with float activations, for decoding), the GGUF block formats ``q8_0``, ``q4_0``, ``q4_1``, ``q4_k`` and
``native`` (a GGUF's weights as stored); ``float32``, ``bfloat16`` and ``float16`` are accepted as the same
names. Each command takes the subset it can honour (``attnlab generate`` and ``chat``: ``DECODE``;
``info --precision``: the same; ``convert``/``info --dtype``/``train --save-dtype``: fp32, bf16, fp16). Nothing here imports torch, so a flag
mistake costs no torch import.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "q8_0", "q4_0", "q4_1", "q4_k", "native")
DECODE = ("fp32", "bf16", "int8", "q8_0", "q4_0", "q4_1", "q4_k", "native")  # what generate and chat run
DECODE_HELP = ("weights for decoding: fp32 (exact), bf16, int8 weight-only, the GGUF block formats q8_0/q4_0/q4_1/"
               "q4_k (integer dot products), or native: a GGUF's weights as the file stores them (default fp32)")
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser whose errors raise ValueError (printed by ``attnlab.cli.main``) instead of exiting."""

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str):  # type: ignore[override]
            raise ValueError(f"{self.prog}: {message}")

    return _Parser(prog=prog, description=description)


def precision_type(choices: Sequence[str], flag: str = "--dtype") -> Callable[[str], str]:
    """An argparse ``type=``: a precision name (or its long alias) among ``choices``, as its short name."""
    def parse(text: str) -> str:
        name = ALIASES.get(text, text)
        if name not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return name

    parse.__name__ = flag  # argparse names the type in its message
    return parse


def add_precision(p: argparse.ArgumentParser, choices: Sequence[str], *, default: str | None, help: str,
                  flag: str = "--dtype") -> None:
    unknown = set(choices) - set(PRECISIONS)
    assert not unknown, unknown
    p.add_argument(flag, type=precision_type(choices, flag), default=default, metavar="{" + ",".join(choices) + "}",
                   help=f"{help} (the long names float32/bfloat16/float16 are accepted too)")


def torch_dtype(name: str) -> torch.dtype:
    """``fp32``/``bf16``/``fp16`` (or an alias) -> the torch dtype."""
    import torch

    return getattr(torch, TORCH_NAMES[ALIASES.get(name, name)])


# Why --compile is not on by default: a decode graph is compiled once per machine into an AOTInductor package
# (inference/aot.py) that later processes load in ~0.1 s, but building it costs ~75-100 s per graph on SmolLM2
# (2 cores): the first `attnlab chat --compile` would wait that long before its first token, against issue 28's
# cold-start target of 30 s. Commands prepare without compiling unless asked; with --compile, every later run
# starts in seconds.
COMPILE_HELP = ("compile the decode steps (eager if no compiler): static-shape graphs for a decoder (the default "
                "mode: built once per machine into cached AOTInductor packages, ~1-2 min the first time, loaded in "
                "~0.1 s after), 'static-jit' (torch.compile in every process), or 'dynamic' (the whole forward "
                "with dynamic shapes; slow to compile). Off by default: the first build delays the first token")


def add_compile(p: argparse.ArgumentParser) -> None:
    """``--compile [static|dynamic]``, opt-in (see ``COMPILE_HELP``)."""
    p.add_argument("--compile", nargs="?", const=True, default=False, choices=["static", "static-jit", "dynamic"],
                   help=COMPILE_HELP)


def add_no_prepare(p: argparse.ArgumentParser) -> None:
    """``--no-prepare``: run the model as loaded, without ``prepare_for_decode``'s fused projections and
    attnlab's kernels (commands prepare their model by default)."""
    p.add_argument("--no-prepare", action="store_true",
                   help="run the model as loaded: no fused projections, no attnlab kernels (for comparisons)")
