"""Shared fixtures: small configs and deterministic seeds."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True, scope="session")
def _static_graphs_through_torch_compile():
    """``compile="static"`` compiles with ``torch.compile`` in tests (``ATTNLAB_AOT=0``) unless the environment
    sets ``ATTNLAB_AOT``: an ahead-of-time package takes 20-80 s to build and its key changes with every edit
    of attnlab's model sources, where inductor's own cache survives them. tests/inference/test_aot.py tests
    the packages; ``ATTNLAB_AOT=1 pytest tests/inference`` runs every compiled test through them. Session
    scope: module fixtures that compile are made with the setting too."""
    import os

    with pytest.MonkeyPatch.context() as mp:
        if "ATTNLAB_AOT" not in os.environ:
            mp.setenv("ATTNLAB_AOT", "0")
        yield


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def isolated_cache(tmp_path_factory, monkeypatch):
    """``$ATTNLAB_CACHE`` in a fresh temporary folder (tokenised data, downloads), with the CPU kernel already built in the
    user's cache linked in, so subprocesses do not compile it again."""
    import os
    from pathlib import Path

    kernels = Path(os.environ.get("ATTNLAB_CACHE") or Path.home() / ".cache" / "attnlab") / "kernels"
    cache = tmp_path_factory.mktemp("cache")  # beside the test's tmp_path, which some tests list
    if kernels.is_dir() and not (cache / "kernels").exists():
        (cache / "kernels").symlink_to(kernels)
    monkeypatch.setenv("ATTNLAB_CACHE", str(cache))
    return cache
