"""A decoder whose LM head scores only some tokens (``head_vocab_size``): the frequent-token head of a draft.

The full logits are the head's at its tokens and -inf elsewhere; the head ids survive a save/load; the
fast and static decode paths agree with eager; and as a speculative draft it keeps decoding exact, greedy
and sampled (a draft may propose from any support).
"""

import pytest
import torch

import attnlab
from attnlab import ModelConfig, build_model
from attnlab.inference.fast import prepare_for_decode
from attnlab.inference.sampling import logits_to_probs


def make(seed, vocab=40, layers=2, std=0.6):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=vocab, d_model=32, n_layers=layers, n_heads=4, n_kv_heads=2,
                                   max_seq_len=96, init_std=std)).eval()


def exact_two_token_distribution(model, prompt, **sampling):
    """P(t1, t2 | prompt) under the model, by enumeration."""
    V = model.config.vocab_size
    with torch.no_grad():
        p1 = logits_to_probs(model(prompt)[0, -1], **sampling)
        p2 = logits_to_probs(model(torch.cat([prompt.repeat(V, 1), torch.arange(V)[:, None]], 1))[:, -1], **sampling)
    return p1[:, None] * p2


def subset_model(vocab=40, n=24, seed=1, layers=1, std=0.6):
    torch.manual_seed(seed)
    m = build_model(ModelConfig(vocab_size=vocab, d_model=32, n_layers=layers, n_heads=4, n_kv_heads=2,
                                max_seq_len=96, init_std=std, tie_embeddings=False, head_vocab_size=n)).eval()
    m.head_token_ids.copy_(torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:n].sort().values)
    return m


def test_full_logits_are_the_heads_at_its_tokens_and_minus_inf_elsewhere():
    m = subset_model()
    x = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        full, sub = m(x), m(x, full_vocab=False)
    assert full.shape == (2, 9, 40) and sub.shape == (2, 9, 24)
    ids = m.head_token_ids
    assert torch.equal(full[..., ids], sub)
    off = torch.ones(40, dtype=torch.bool)
    off[ids] = False
    assert torch.isneginf(full[..., off]).all()
    assert set(full.argmax(-1).flatten().tolist()) <= set(ids.tolist())


def test_the_head_ids_survive_save_and_load(tmp_path):
    m = subset_model(seed=3)
    m.save_pretrained(tmp_path / "m")
    back = attnlab.from_pretrained(tmp_path / "m")
    assert torch.equal(back.head_token_ids, m.head_token_ids)
    x = torch.randint(0, 40, (1, 7))
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


@pytest.mark.parametrize("compile", [False, "static"])
def test_fast_and_static_paths_give_the_same_greedy_tokens(compile):
    m = subset_model(seed=4, layers=2)
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    expected = attnlab.generate(m, ids, 12)
    fast = prepare_for_decode(subset_model(seed=4, layers=2), precision="fp32", compile=compile)
    assert torch.equal(attnlab.generate(fast, ids, 12), expected)


@pytest.mark.parametrize("gamma", [1, 4])
def test_as_a_draft_greedy_output_is_plain_greedy(gamma):
    target, draft = make(0), subset_model(seed=5)
    gen = torch.Generator().manual_seed(gamma)
    for batch in (1, 3):
        ids = torch.randint(0, 40, (batch, 5), generator=gen)
        out, stats = attnlab.speculative_generate(target, draft, ids, 24, gamma=gamma, return_stats=True)
        assert torch.equal(out, attnlab.generate(target, ids, 24))
        assert stats.target_calls < 24 + 1


def test_as_a_draft_sampling_is_distributed_as_the_target():
    target = make(3, vocab=6, std=0.8)
    draft = subset_model(vocab=6, n=4, seed=6, std=0.8)  # never proposes 2 of the 6 tokens
    prompt = torch.tensor([[1, 4, 2]])
    exact = exact_two_token_distribution(target, prompt, temperature=1.0)
    n = 20000
    out = attnlab.speculative_generate(target, draft, prompt.repeat(n, 1), 2, gamma=3, seed=0, temperature=1.0)
    counts = torch.zeros(6, 6)
    counts.index_put_((out[:, 3], out[:, 4]), torch.ones(n), accumulate=True)
    assert 0.5 * (counts / n - exact).abs().sum() < 0.03
    missing = [t for t in range(6) if t not in draft.head_token_ids.tolist()]
    assert all(counts[t].sum() > 0 for t in missing)  # tokens the draft cannot propose still come out


def test_bad_head_configs_are_named():
    with pytest.raises(ValueError, match="head_vocab_size=50 must be an integer in"):
        ModelConfig(vocab_size=40, head_vocab_size=50)
    with pytest.raises(ValueError, match="tie_embeddings=False"):
        ModelConfig(vocab_size=40, head_vocab_size=8)
