"""The shipped default models: trained well past the unigram baseline, sharing one tokenizer."""

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.hub import shipped_dir
from attnlab.training.corpus import split_of
from attnlab.training.data import unigram_cross_entropy

try:
    shipped_dir("default")
    shipped_dir("default-draft")
    SHIPPED = True
except FileNotFoundError:
    SHIPPED = False

pytestmark = pytest.mark.skipif(not SHIPPED, reason="the default models are not shipped in this checkout")


def held_out_tokens(tok, split: str, n_files: int) -> np.ndarray:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.glob("*.py")) if split_of(str(p.relative_to(root))) == split][:n_files]
    ids = []
    for f in files:
        ids += tok.encode(f.read_text(encoding="utf-8", errors="replace")) + [tok.eos_token_id]
    return np.array(ids)


@pytest.mark.parametrize("name", ["default", "default-draft"])
def test_validation_loss_is_well_below_the_unigram_baseline(name):
    model, tok = attnlab.from_pretrained(name), attnlab.load_tokenizer(name)
    train = held_out_tokens(tok, "train", 60)
    val = held_out_tokens(tok, "validation", 12)
    baseline = unigram_cross_entropy(train, val, model.config.vocab_size)
    T = 256
    windows = torch.from_numpy(val[: (len(val) // (T + 1)) * (T + 1)].astype(np.int64)).view(-1, T + 1)[:16]
    with torch.no_grad():
        logits = model(windows[:, :-1])
        loss = float(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()))
    assert loss < 0.75 * baseline, f"{name}: validation loss {loss:.3f} vs unigram {baseline:.3f} nats/token"
    assert math.isfinite(loss)


def test_target_and_draft_share_the_tokenizer_and_draft_for_each_other():
    target, draft = attnlab.from_pretrained("default"), attnlab.from_pretrained("default-draft")
    t_tok, d_tok = attnlab.load_tokenizer("default"), attnlab.load_tokenizer("default-draft")
    assert t_tok.backend.to_str() == d_tok.backend.to_str()
    ids = torch.tensor([t_tok.encode("def fibonacci(n):\n    ")])
    out = attnlab.generate(target, ids, 24, draft=draft, gamma=4)
    assert torch.equal(out, attnlab.generate(target, ids, 24))
    assert target.num_parameters() > 5 * draft.num_parameters()
