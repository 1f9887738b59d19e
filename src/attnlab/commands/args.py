"""What every command's flags share: a parser whose mistakes are one ``error:`` line, and one precision
vocabulary.

Precisions are named the same way in every command: ``fp32``, ``bf16``, ``fp16``, ``int8`` (int8 weights
with float activations, for decoding), the GGUF block formats ``q8_0``, ``q4_0``, ``q4_1``, ``q4_k`` and
``native`` (a GGUF's weights as stored); ``float32``, ``bfloat16`` and ``float16`` are accepted as the same
names. Each command and benchmark takes the subset it can honour (``attnlab generate`` and ``chat``:
``DECODE``; ``info --precision``: the same; ``convert``/``info --dtype``/``train --save-dtype``: fp32, bf16,
fp16; ``data teacher --precision``: fp32, bf16, int8; the benchmarks their own) through ``add_precision``
(one name, or several with ``nargs``) or ``precision_list`` (a comma-separated list). ``--compile`` has one
vocabulary too, ``COMPILE_MODES`` (``add_compile``). Nothing here imports torch, so a flag mistake costs no
torch import.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "q8_0", "q4_0", "q4_1", "q4_k", "native")
# what generate and chat run: inference.fast's PRECISIONS + NATIVE, written out so that parsing a flag imports no
# torch (tests/test_cli_prepare.py checks that the two agree)
DECODE = ("fp32", "bf16", "int8", "q8_0", "q4_0", "q4_1", "q4_k", "native")
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


def _aliases_note(choices: Sequence[str]) -> str:
    longs = [long for long, short in ALIASES.items() if short in choices]
    if not longs:
        return ""
    return f"the long names {'/'.join(longs)} are accepted too" if len(longs) > 1 else f"{longs[0]} is accepted too"


def precision_list(choices: Sequence[str], flag: str = "--precisions") -> Callable[[str], tuple[str, ...]]:
    """An argparse ``type=``: a comma-separated list of precision names (or long aliases) among ``choices``, as a
    tuple of short names in the order given."""
    one = precision_type(choices, flag)

    def parse(text: str) -> tuple[str, ...]:
        try:
            names = tuple(one(item.strip()) for item in text.split(",") if item.strip())
        except argparse.ArgumentTypeError:
            names = ()
        if not names:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}, separated by commas")
        return names

    parse.__name__ = flag
    return parse


def add_precision(p: argparse.ArgumentParser, choices: Sequence[str], *, default: str | Sequence[str] | None,
                  help: str, flag: str = "--dtype", nargs: str | None = None) -> None:
    """``flag`` taking one precision among ``choices`` (or, with ``nargs="+"``, several), as short names."""
    unknown = set(choices) - set(PRECISIONS)
    assert not unknown, unknown
    note = _aliases_note(choices)
    p.add_argument(flag, type=precision_type(choices, flag), default=default, nargs=nargs,
                   metavar="{" + ",".join(choices) + "}", help=f"{help} ({note})" if note else help)


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


COMPILE_MODES = ("static", "static-jit", "dynamic")  # prepare_for_decode's compile= names (True: its default)


def add_compile(p: argparse.ArgumentParser, help: str = COMPILE_HELP) -> None:
    """``--compile [static|static-jit|dynamic]``, opt-in (see ``COMPILE_HELP``): False when absent, True when
    given bare (the model family's default mode), else the mode named."""
    p.add_argument("--compile", nargs="?", const=True, default=False, choices=COMPILE_MODES, help=help)


def add_no_prepare(p: argparse.ArgumentParser) -> None:
    """``--no-prepare``: run the model as loaded, without ``prepare_for_decode``'s fused projections and
    attnlab's kernels (commands prepare their model by default)."""
    p.add_argument("--no-prepare", action="store_true",
                   help="run the model as loaded: no fused projections, no attnlab kernels (for comparisons)")


def run_command(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run a command's ``main(argv)`` as the CLI does: a user error (bad config, bad file, prompt too long, ...)
    is one ``error: ...`` line on stderr and exit status 2, never a traceback; Ctrl-C is 130."""
    try:
        return int(main(argv) or 0)
    except (ValueError, FileNotFoundError, NotImplementedError, PermissionError, IsADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
