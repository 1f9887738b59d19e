"""Token ids in, text out as it arrives: the one text streamer of ``attnlab generate``, ``chat`` and the
Python ``chat_once(stream=...)``.

Decoding each new token alone would split multi-byte characters; decoding the whole output again at every
token costs O(n^2). ``TextStream`` keeps only the tokens of the character being completed.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from attnlab.tokenizer import Tokenizer


class TextStream:
    """Token ids in, printable text out, one whole character at a time.

    A byte-level token may end inside a multi-byte UTF-8 character (an emoji spans several tokens);
    its decoded text then ends with U+FFFD. Those tokens are held back until the character completes
    (or 4 tokens later, for a model that really emits an invalid sequence). Special tokens are dropped.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        self.pending.append(int(token_id))
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 4:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


def print_stream(piece: str) -> None:
    """A ``stream=`` target for chat_once: write to stdout as the text arrives."""
    sys.stdout.write(piece)
    sys.stdout.flush()
