"""Text from the command line and stdin, decoded by one policy: strict UTF-8, an error at the first bad byte.

Python hands the bytes of ``argv`` (and of stdin under a C/POSIX locale) that are not valid UTF-8 to the
program as lone surrogates (PEP 383 ``surrogateescape``: byte 0xNN becomes U+DCNN); the tokenizer then fails
with ``TypeError: TextInputSequence must be str``. Every command that takes text (``generate --prompt``,
``generate --chat``, ``chat``, ``translate``) passes it through :func:`check_text`, which refuses such text
with a ``ValueError`` naming where it came from and the byte offset of the first invalid byte (the CLI
prints it as one ``error:`` line and exits 2). Nothing is replaced silently: a prompt the model would read
differently from what the user typed is an error, not a guess.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TextIO


def check_text(text: str, source: str) -> str:
    """``text`` if it is valid Unicode; else ``ValueError`` naming ``source`` and the first invalid byte."""
    if not isinstance(text, str):
        raise ValueError(f"{source} must be text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # U+DCNN -> the original byte 0xNN
    except UnicodeEncodeError as exc:  # a surrogate that is no escaped byte (built in Python, say)
        raise ValueError(f"{source} holds the lone surrogate U+{ord(text[exc.start]):04X} at character "
                         f"{exc.start}: it is not valid Unicode text") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source} is not valid UTF-8: byte 0x{raw[exc.start]:02x} at byte offset {exc.start} "
                         f"({exc.reason}); convert the text to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def check_lines(lines: Iterable[str], source: str = "stdin") -> Iterator[str]:
    """Each line without its newline, checked by :func:`check_text` and named ``SOURCE line N``."""
    for number, line in enumerate(lines, start=1):
        yield check_text(line.rstrip("\n"), f"{source} line {number}")


def lenient_stdin() -> TextIO:
    """``sys.stdin`` set to hand undecodable bytes on as surrogates (whatever the locale), so that
    :func:`check_text` reports them with their offset instead of the reader failing mid-stream."""
    stdin = sys.stdin
    if hasattr(stdin, "reconfigure") and getattr(stdin, "errors", None) != "surrogateescape":
        stdin.reconfigure(errors="surrogateescape")
    return stdin


__all__ = ["check_lines", "check_text", "lenient_stdin"]
