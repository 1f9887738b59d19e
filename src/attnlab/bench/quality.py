"""``attnlab bench quality``: the perplexity part of ``attnlab bench peer`` alone (see ``bench/peer_quality.py``).

    attnlab bench quality                       # every row of bench peer, perplexity only, ~a minute a row
"""

from __future__ import annotations

from attnlab.bench import peer


def main(argv: list[str]) -> int:
    return peer.main(["--quality-only", "--rounds", "1", *argv])
