"""The ``attnlab`` command: info | generate | translate | chat | train | data NAME | bench NAME | tour | convert.

Every subcommand prints a user error (bad config, bad checkpoint, prompt too long, ...) as one line
``error: ...`` and exits with status 2 — never a traceback. Commands owned by other parts of the package
(train, bench, tour, chat, convert) receive their remaining arguments and parse them themselves.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module with ``main(argv: list[str]) -> int`` (each parses its own flags)
DELEGATED = {
    "train": "attnlab.training.cli",
    "tour": "attnlab.tour",
    "chat": "attnlab.chat",
    "convert": "attnlab.convert",
    "data": "attnlab.commands.data",
    "translate": "attnlab.commands.translate",
}

USAGE = """attnlab <command> [options]

commands:
  info       parameters and KV-cache bytes of a model or config, with its MHA/GQA/MQA siblings
  generate   generate text (or token ids) from a model
  translate  translate English to Spanish with an encoder-decoder (e.g. translate-en-es)
  chat       interactive chat with a model that has a chat template
  train      train a model on the built-in corpus or your own data
  data       build a data set on this machine: attnlab data translation --out DIR
  bench      run a benchmark: attnlab bench NAME (decode, attention, ...)
  tour       the field guide run as measured experiments, written to a report
  convert    convert a checkpoint (e.g. to fewer KV heads)

`attnlab <command> --help` shows a command's options."""


def _run_delegated(command: str, argv: list[str]) -> int:
    return int(importlib.import_module(DELEGATED[command]).main(argv) or 0)


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        from attnlab.commands.info import main as info_main

        return info_main(rest)
    if command == "generate":
        from attnlab.commands.generate import main as generate_main

        return generate_main(rest)
    if command == "bench":
        from attnlab.bench import BENCHES, run_bench

        if not rest or rest[0] in ("-h", "--help"):
            print(f"usage: attnlab bench NAME [options]\nbenchmarks: {', '.join(sorted(BENCHES))}")
            return 0 if rest else 2
        return run_bench(rest[0], rest[1:])
    if command in DELEGATED:
        return _run_delegated(command, rest)
    raise ValueError(f"unknown command {command!r}; run `attnlab --help` for the list")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _dispatch(argv)
    except (ValueError, FileNotFoundError, NotImplementedError, PermissionError, IsADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser whose errors raise ValueError (printed by ``main``) instead of exiting."""

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str):  # type: ignore[override]
            raise ValueError(f"{self.prog}: {message}")

    return _Parser(prog=prog, description=description)


if __name__ == "__main__":
    sys.exit(main())
