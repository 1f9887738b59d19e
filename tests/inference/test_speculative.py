"""Speculative decoding: greedy output identical to plain greedy (sampling: test_speculative_exact.py)."""


import pytest
import torch

import attnlab
from attnlab import ModelConfig, build_model
from attnlab.inference.drafters import HybridDrafter
from attnlab.inference.speculative import choose_gamma, expected_tokens_per_call


def make(seed, vocab=40, layers=2, std=0.6, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=layers, n_heads=4, n_kv_heads=2, max_seq_len=96,
                      init_std=std, **kw)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def target():
    return make(0)


@pytest.fixture(scope="module")
def drafts(target):
    close = make(0)  # a "real" draft: the target's weights, perturbed (accepts some, rejects some)
    with torch.no_grad():
        for p in close.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    return {"self": target, "random": make(1, layers=1), "close": close, "lookup": "prompt_lookup",
            "hybrid": HybridDrafter(close, min_match=1)}


@pytest.mark.parametrize("kind", ["self", "random", "close", "lookup", "hybrid"])
@pytest.mark.parametrize("gamma", [1, 2, 5, 8])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_is_identical_to_plain_greedy(target, drafts, kind, gamma, batch):
    gen = torch.Generator().manual_seed(gamma * 10 + batch)
    for _ in range(3):
        ids = torch.randint(0, 40, (batch, int(torch.randint(1, 12, (1,), generator=gen))), generator=gen)
        expected = attnlab.generate(target, ids, 30)
        out, stats = attnlab.speculative_generate(target, drafts[kind], ids, 30, gamma=gamma, return_stats=True)
        assert torch.equal(out, expected)
        if kind == "self":
            assert stats.acceptance_rate == 1.0 and stats.alpha == 1.0 and stats.rejected == 0


def test_the_prompt_is_fed_to_the_target_as_plain_decoding_feeds_it(target, drafts):
    """One call with the whole prompt, then single tokens or drafts: a prompt fed as T - 1 tokens leaves K/V
    that differ in the last bits (products over another number of rows), which in bf16 parted SmolLM2's
    speculative output from its plain output at a near-tie."""
    seen = []
    handle = target.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        ids = torch.randint(0, 40, (2, 9))
        attnlab.generate(target, ids, 6)
        plain_first = seen[0]
        seen.clear()
        attnlab.speculative_generate(target, drafts["close"], ids, 6, gamma=3)
    finally:
        handle.remove()
    assert plain_first == 9 and seen[0] == 9 and all(w <= 4 for w in seen[1:])


def test_acceptance_differs_per_row_and_stays_exact(target, drafts):
    ids = torch.randint(0, 40, (6, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[4, :5] = 0
    expected = attnlab.generate(target, ids, 40, attention_mask=mask)
    out, stats = attnlab.speculative_generate(target, drafts["close"], ids, 40, gamma=4, attention_mask=mask,
                                              return_stats=True)
    assert torch.equal(out, expected)
    assert 0.0 < stats.acceptance_rate < 1.0
    # every examined position is accepted or is its round's single rejection
    assert 0 < stats.rejected <= stats.target_calls * 6
    assert stats.alpha == stats.accepted / (stats.accepted + stats.rejected)
    assert stats.alpha >= stats.acceptance_rate


def test_eos_and_adaptive_gamma(target, drafts):
    ids = torch.randint(0, 40, (2, 5))
    plain = attnlab.generate(target, ids, 30)
    eos = int(plain[0, 5 + 7])
    expected = attnlab.generate(target, ids, 30, eos_token_id=eos)
    for draft in (drafts["close"], drafts["self"]):
        got = attnlab.generate(target, ids, 30, eos_token_id=eos, draft=draft, gamma=6, adaptive=True)
        assert torch.equal(got, expected)


def test_stream_receives_the_same_tokens(target, drafts):
    ids = torch.randint(0, 40, (2, 4))
    seen = []
    out = attnlab.generate(target, ids, 20, draft=drafts["close"], stream=lambda t: seen.append(t.tolist()))
    assert torch.tensor(seen).T.tolist() == out[:, 4:].tolist()


def test_hybrid_uses_both_sources_and_stays_exact_with_padding(target, drafts):
    """Rows with a repeated pattern and a 40-token vocabulary, so that lookup (on the last token) matches in
    some rounds and not in others (the model drafts); a batch of 4 with left padding. A batch takes a lookup
    round only when every generating row has a match."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 40, (4, 12), generator=gen)
    ids[:, 6:] = torch.tensor([5, 6, 7] * 2)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[3, :2] = 0
    hybrid = HybridDrafter(drafts["close"], min_match=1)
    for gamma in (2, 5):
        expected = attnlab.generate(target, ids, 40, attention_mask=mask)
        out, stats = attnlab.speculative_generate(target, hybrid, ids, 40, gamma=gamma, attention_mask=mask,
                                                  return_stats=True)
        assert torch.equal(out, expected)
        assert hybrid.lookup_rounds > 0 and hybrid.model_rounds > 0
        assert stats.generated >= 4 * 39  # the first token comes from the prompt's own call


def test_hybrid_refuses_a_draft_with_another_vocabulary(target):
    with pytest.raises(ValueError, match="vocabulary"):
        attnlab.speculative_generate(target, HybridDrafter(make(1, vocab=50)), torch.tensor([[1, 2]]), 4)


def test_expected_tokens_formula_and_gamma_choice():
    assert expected_tokens_per_call(0.0, 5) == 1.0
    assert expected_tokens_per_call(1.0, 5) == 6.0
    assert abs(expected_tokens_per_call(0.5, 2) - 1.75) < 1e-12
    assert choose_gamma(0.95, 0.01, 8) == 8  # cheap, accurate draft: draft long
    assert choose_gamma(0.2, 0.5, 8) == 1  # expensive, poor draft: draft short


def test_bad_inputs(target):
    other_vocab = make(0, vocab=41)
    with pytest.raises(ValueError, match="vocabulary .*41 tokens.* differs"):
        attnlab.speculative_generate(target, other_vocab, [[1, 2]], 5)
    with pytest.raises(ValueError, match="gamma=0 must be an integer >= 1"):
        attnlab.speculative_generate(target, target, [[1, 2]], 5, gamma=0)
    short = build_model(target.config.replace(max_seq_len=16)).eval()
    with pytest.raises(ValueError, match="longer than the draft model's context"):
        attnlab.speculative_generate(target, short, [[1, 2, 3]], 20)
    with pytest.raises(ValueError, match="cannot use"):
        attnlab.speculative_generate(target, 42, [[1, 2]], 5)

    class ProposesButNeverCommits:  # half a Drafter: not taken as one
        def start(self, prompt, attention_mask, capacity): ...

        def propose(self, gamma, sampling, generator, rows=None): ...

    with pytest.raises(ValueError, match="cannot use ProposesButNeverCommits as a draft"):
        attnlab.speculative_generate(target, ProposesButNeverCommits(), [[1, 2]], 5)
    with pytest.raises(ValueError, match="cannot use Linear as a draft"):  # a module, but not an attnlab model
        attnlab.speculative_generate(target, torch.nn.Linear(2, 2), [[1, 2]], 5)
