"""Where attnlab keeps what it can rebuild: ``$ATTNLAB_CACHE`` (default ``~/.cache/attnlab``).

Tokenised corpora (``data/``), the Debian packages of the translation data (``translation/``) and the
compiled CPU kernel (``kernels/``) live in sub-folders of this one directory. ``ATTNLAB_CACHE_DIR``, the
name the kernel cache read before, is still honoured when ``ATTNLAB_CACHE`` is unset.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$ATTNLAB_CACHE/<parts...>`` (not created: callers make what they write into)."""
    root = os.environ.get("ATTNLAB_CACHE") or os.environ.get("ATTNLAB_CACHE_DIR")
    return Path(root).expanduser().joinpath(*parts) if root else Path.home().joinpath(".cache", "attnlab", *parts)
