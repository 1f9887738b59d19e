import sysconfig
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A folder of real Python files (a slice of the standard library), small enough for fast tests."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("corpus")
    for f in sorted(root.glob("*.py"))[:40]:
        (out / f.name).write_text(f.read_text(encoding="utf-8", errors="replace"))
    return out


@pytest.fixture(autouse=True)
def _cache(isolated_cache):
    return isolated_cache
