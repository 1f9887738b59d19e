"""Fixtures of the GGUF tests: a trained tiny tokenizer and tiny GGUF files by (architecture, type)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib adds no test folder: tiny_gguf.py is here
gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
from tiny_gguf import Q, make_hf, train_tokenizer, write_gguf  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tok):
    """(arch, qtype) -> (HF model holding the weights as stored, path of the GGUF)."""
    made: dict = {}

    def get(arch: str, qtype=Q.F32):
        if (arch, qtype) not in made:
            torch.manual_seed(0)
            hf = make_hf(arch, tok.get_vocab_size())
            path = tmp_path_factory.mktemp(f"{arch}-{qtype.name}") / "tiny.gguf"
            stored = write_gguf(path, hf, arch, tok, qtype)
            ref = make_hf(arch, tok.get_vocab_size())
            state = {**hf.state_dict(), **stored}
            if hf.config.tie_word_embeddings:  # the head is the table as stored, not the float original
                state["lm_head.weight"] = state["model.embed_tokens.weight"]
            ref.load_state_dict(state)
            made[arch, qtype] = (hf, ref.eval(), path)
        return made[arch, qtype]

    return get
