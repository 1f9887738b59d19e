"""Atomic file writes, the one way attnlab puts a file on disk: the content goes to a temporary name beside
the target (unique per writer), is fsync'ed, and is renamed over the target, so a crash at any moment leaves
the old file or the new one, never half of one. ``checkpoint.py`` builds whole model directories on these;
every other writer in the package (configs, caches, datasets, figures, benchmark results) calls them
directly (``tests/reliability/test_writes.py`` holds that). Standard library only, so that any module, the
config included, can use it without an import cycle.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

TMP_MARK = ".tmp-"  # temporary files and folders carry this in their names (removed by clean_leftovers)


def pause_point(point: str) -> None:
    """Fault-injection hook for the reliability tests: when ``$ATTNLAB_TEST_PAUSE`` matches ``point`` (a glob
    over ``write:<file path>`` or ``dir:<directory path>``), say so on stdout and sleep, so a test can kill
    the process at exactly this moment of a save: the temporary copy is complete, its rename not done.
    ``$ATTNLAB_TEST_PAUSE_SKIP=N`` lets the first N matching moments pass; with ``$ATTNLAB_TEST_PAUSE_UNTIL=<file>``
    the process resumes once that file exists (a test interleaves two writers)."""
    pattern = os.environ.get("ATTNLAB_TEST_PAUSE")
    if not pattern or not fnmatch.fnmatchcase(point, pattern):
        return
    skip = int(os.environ.get("ATTNLAB_TEST_PAUSE_SKIP", "0"))
    if skip > 0:
        os.environ["ATTNLAB_TEST_PAUSE_SKIP"] = str(skip - 1)
        return
    print(f"paused at {point}", file=sys.stdout, flush=True)
    until = os.environ.get("ATTNLAB_TEST_PAUSE_UNTIL")
    while not (until and os.path.exists(until)):
        time.sleep(0.05 if until else 60)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def umask() -> int:
    """The process's umask (read without changing it where Linux reports it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_file(path: str | Path, write: Callable[[Path], None], *, suffix: str = "") -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it over ``path``.

    The temporary name is unique (``.<name>.tmp-XXXXXXXX<suffix>``, made by ``mkstemp``), so writers in
    several processes never share one; ``suffix`` is for writers that insist on an extension (AOTInductor's
    ``.pt2``). ``write`` receives an existing empty file to replace or fill. The file is fsync'ed before the
    rename; if anything raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644 & ~umask())  # mkstemp makes it private; these are ordinary readable files
        fsync_file(tmp)
        pause_point(f"write:{path.absolute()}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_file(path, lambda p: p.write_text(text, encoding="utf-8"))
