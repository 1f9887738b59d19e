"""The one check of sampling settings, free of torch so that a command can run it before loading anything.

Used by ``generate``, ``speculative_generate``, ``ChatSession`` and the ``attnlab generate``/``chat`` commands
(re-exported by :mod:`attnlab.inference.sampling`).
"""

from __future__ import annotations

import math


def _real(value: object) -> bool:
    """A real number (int or float, not bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None,
                        repetition_penalty: float | None = None, *, flags: bool = False) -> None:
    """The one validator of sampling settings (generate, speculative decoding, ``attnlab generate``/``chat``).

    Raises ``ValueError`` naming the setting: ``temperature`` a finite number >= 0 (0 = greedy); ``top_k`` an
    integer >= 1 or None; ``top_p`` in (0, 1] or None; ``repetition_penalty`` a finite number > 0 or None.
    NaN and infinity are refused (a NaN temperature turns every probability into NaN). ``flags=True`` names
    them as the CLI flags (``--top-k``) so that a command can check them before it loads a model.
    """
    def name(key: str) -> str:
        return "--" + key.replace("_", "-") + " " if flags else key + "="

    if not _real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{name('temperature')}{temperature!r}: the temperature must be a finite number >= 0 "
                         f"(0 means greedy)")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"{name('top_k')}{top_k!r}: top-k must be an integer >= 1 (or unset, for no top-k filter)")
    if top_p is not None and (not _real(top_p) or not (0.0 < top_p <= 1.0)):
        raise ValueError(f"{name('top_p')}{top_p!r}: top-p must be in (0, 1] (or unset, for no nucleus filter)")
    if repetition_penalty is not None and (not _real(repetition_penalty) or not math.isfinite(repetition_penalty)
                                           or repetition_penalty <= 0):
        raise ValueError(f"{name('repetition_penalty')}{repetition_penalty!r}: the repetition penalty must be a "
                         f"finite number > 0 (1 = none)")
