"""The ``attnlab`` command: one table of subcommands, each a module with ``main(argv) -> int`` that parses
its own flags (with ``attnlab.commands.args.parser``).

Every subcommand prints a user error (bad config, bad checkpoint, prompt too long, ...) as one line
``error: ...`` and exits with status 2 — never a traceback.
"""

from __future__ import annotations

import importlib
import sys

from attnlab.commands.args import run_command

# command -> (module with ``main(argv: list[str]) -> int``, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("attnlab.commands.info", "parameters and KV-cache bytes of a model or config, with its MHA/GQA/MQA "
                                      "siblings"),
    "generate": ("attnlab.commands.generate", "generate text (or token ids) from a model"),
    "translate": ("attnlab.commands.translate", "translate English to Spanish with an encoder-decoder "
                                                "(e.g. translate-en-es)"),
    "chat": ("attnlab.commands.chat", "interactive chat with a model that has a chat template"),
    "train": ("attnlab.training.cli", "train a model on the built-in corpus or your own data"),
    "data": ("attnlab.commands.data", "build a data set on this machine: attnlab data translation --out DIR"),
    "bench": ("attnlab.bench", "run a benchmark: attnlab bench NAME (decode, attention, ...)"),
    "tour": ("attnlab.tour", "the field guide run as measured experiments, written to a report"),
    "convert": ("attnlab.commands.convert", "convert a checkpoint (e.g. to fewer KV heads)"),
}

USAGE = "attnlab <command> [options]\n\ncommands:\n" + "\n".join(
    f"  {name:<10} {what}" for name, (_, what) in COMMANDS.items()) + "\n\n`attnlab <command> --help` shows a " \
    "command's options."


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; run `attnlab --help` for the list")
    return int(importlib.import_module(COMMANDS[command][0]).main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    return run_command(_dispatch, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
