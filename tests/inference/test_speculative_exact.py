"""Speculative sampling is exact: the whole output sequence is distributed as sampling from the target alone.

The claim (Leviathan et al. 2023; Chen et al. 2023): accept each proposal d_i with probability
min(1, p_i(d_i) / q_i(d_i)), sample from norm(max(0, p_i - q_i)) at the first rejection and from p_{γ+1}
when all γ are accepted, and the committed tokens are distributed exactly as tokens drawn one at a time
from p. Every part of that rule is exercised here, not only its first step:

- a real attnlab decoder as the target (random weights, a V = 4 vocabulary), so its next-token
  distribution depends on the whole prefix, and N = 5 new tokens: the first comes from the prompt's own
  call, then the first round drafts γ = 3 tokens, so the multi-token acceptance chain, a rejection at any
  of positions 1..3 (the residual step) and the bonus token p_{γ+1} (all three accepted: 1 + 3 + 1 = 5
  tokens) all reach the output;
- the exact law of the V^N = 1024 whole continuations under the target alone, by enumeration: one
  teacher-forced forward over all of them, with temperature, top-k and top-p applied by
  ``logits_to_probs``, the one function plain sampling uses;
- 20,000 speculative samples per case, drawn at once as a batch of 20,000 copies of the prompt (rows are
  sampled independently: one generator, every row's draws its own), with drafts that are deliberately bad
  (another random model), equal to the target, and in between (the target's weights perturbed);
- Pearson's chi-square goodness of fit over whole sequences. Bins are sorted by expected count and merged
  in that order until each merged bin expects at least 5 samples; a sample in a bin of probability 0 (a
  sequence top-k / top-p rule out) fails outright. The p-value is the chi-square survival function
  (``torch.special.gammaincc``), and a case fails when p < ALPHA = 1e-4: a correct implementation fails a
  given case with probability 1e-4 per random seed (the seeds are fixed, so the outcome is reproducible),
  under 1e-3 for the whole module.

A batch whose rows have two different prompts (left-padded) checks each prompt's rows against its own law,
and the joint law of the last tokens of row pairs (2i, 2i + 1) against the product of the two exact
marginals: rows that influenced each other, or whose padding leaked, would fail it.

Checked by breaking ``_verify`` in inference/speculative.py on purpose (see the report of the change):
sampling from p instead of the residual after a rejection, drawing the bonus token from p_γ instead of
p_{γ+1}, and accepting with probability p(d) instead of min(1, p/q) each make these tests fail.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import attnlab
from attnlab import ModelConfig, build_model
from attnlab.inference.sampling import logits_to_probs

V, N_NEW, GAMMA, SAMPLES, ALPHA = 4, 5, 3, 20000, 1e-4


def make(seed: int, layers: int = 1, std: float = 1.0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, d_model=16, n_layers=layers, n_heads=2, n_kv_heads=1, d_ff=32,
                      max_seq_len=24, init_std=std)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def models():
    target = make(0)
    between = make(0)  # the target's weights, perturbed: accepts some proposals, rejects others
    with torch.no_grad():
        for p in between.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return {"target": target, "equal": target, "between": between, "bad": make(1, layers=2, std=1.5)}


@torch.no_grad()
def exact_law(model, prompt: list[int], n: int, **sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """(V^n,) float64 probabilities of every continuation of ``n`` tokens under ``model`` alone, and the
    (V^n, n) continuations in ``itertools.product`` order (so that index = base-V number of the tokens)."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n)))  # (S, n)
    full = torch.cat([torch.tensor(prompt).repeat(len(seqs), 1), seqs], dim=1)  # (S, T + n)
    T = len(prompt)
    p = logits_to_probs(model(full[:, :-1])[:, T - 1:], **sampling)  # (S, n, V): p(x_i | prompt, x_<i)
    return p.double().gather(-1, seqs[..., None]).squeeze(-1).prod(dim=-1), seqs


def sequence_index(tokens: torch.Tensor) -> torch.Tensor:
    """(R, n) tokens -> (R,) index into ``exact_law``'s order."""
    weights = V ** torch.arange(tokens.shape[1] - 1, -1, -1)
    return (tokens * weights).sum(dim=1)


def chi_square(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int, float]:
    """Pearson's goodness of fit of ``counts`` to ``probs`` with small bins merged: (statistic, df, p-value).

    A count in a bin of probability 0 gives p = 0. Bins are merged in order of increasing expected count
    until each expects ``min_expected``; a short remainder joins the last merged bin."""
    counts, probs = counts.double(), probs.double()
    total = float(counts.sum())
    if bool((counts[probs <= 0] > 0).any()):
        return float("inf"), 0, 0.0
    order = torch.argsort(probs[probs > 0])
    e_all, o_all = (probs[probs > 0] * total)[order].tolist(), counts[probs > 0][order].tolist()
    groups: list[list[float]] = []
    e_acc = o_acc = 0.0
    for e, o in zip(e_all, o_all):
        e_acc, o_acc = e_acc + e, o_acc + o
        if e_acc >= min_expected:
            groups.append([e_acc, o_acc])
            e_acc = o_acc = 0.0
    if e_acc > 0 or o_acc > 0:
        if groups:
            groups[-1][0] += e_acc
            groups[-1][1] += o_acc
        else:
            groups.append([e_acc, o_acc])
    stat = sum((o - e) ** 2 / e for e, o in groups)
    df = len(groups) - 1
    if df < 1:
        return stat, df, 1.0
    p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))
    return stat, df, p


def assert_exact(out_new: torch.Tensor, probs: torch.Tensor, what: str) -> None:
    counts = torch.bincount(sequence_index(out_new), minlength=len(probs))
    stat, df, p = chi_square(counts, probs)
    tv = 0.5 * float((counts.double() / counts.sum() - probs).abs().sum())
    assert p >= ALPHA, (f"{what}: speculative samples do not follow the target's law: chi-square {stat:.1f} "
                        f"on {df} df, p = {p:.2e} < {ALPHA}; total variation {tv:.4f}")


CASES = [  # (draft, sampling, seed)
    ("bad", dict(temperature=1.0), 0),
    ("equal", dict(temperature=1.0), 1),
    ("between", dict(temperature=1.0), 2),
    ("between", dict(temperature=0.8, top_k=3), 3),
    ("bad", dict(temperature=1.2, top_p=0.8), 4),
    ("bad", dict(temperature=0.9, top_k=3, top_p=0.9), 5),
]


@pytest.mark.parametrize("draft, sampling, seed", CASES, ids=[f"{d}-{'-'.join(map(str, s.items()))}"
                                                              for d, s, _ in CASES])
def test_whole_sequences_follow_the_target(models, draft, sampling, seed):
    prompt = [1, 3, 0]
    probs, _ = exact_law(models["target"], prompt, N_NEW, **sampling)
    out, stats = attnlab.speculative_generate(models["target"], models[draft], torch.tensor([prompt]).repeat(SAMPLES, 1),
                                              N_NEW, gamma=GAMMA, seed=seed, return_stats=True, **sampling)
    assert stats.gammas[0] == GAMMA  # the first round drafts γ = 3: the chain, the residual and the bonus count
    if draft == "equal":
        assert stats.acceptance_rate > 0.99
    else:
        assert 0.05 < stats.acceptance_rate < 0.95  # both branches (accept, residual) are taken often
    assert_exact(out[:, len(prompt):], probs, f"draft {draft}, {sampling}")


def test_the_check_rejects_the_drafts_own_law(models):
    """The same check has teeth: as many sequences drawn from the bad draft's exact law fail it."""
    sampling = dict(temperature=1.0)
    probs, _ = exact_law(models["target"], [1, 3, 0], N_NEW, **sampling)
    wrong, seqs = exact_law(models["bad"], [1, 3, 0], N_NEW, **sampling)
    draws = seqs[torch.multinomial(wrong.float(), SAMPLES, replacement=True, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(AssertionError, match="do not follow"):
        assert_exact(draws, probs, "the draft's own samples")


def test_a_batch_of_two_prompts_is_exact_and_its_rows_independent(models):
    """Rows alternate between a 2-token and a 4-token prompt (the short one left-padded), so rows reach
    max_new_tokens in different rounds; each prompt's rows follow that prompt's law, and the last tokens of
    neighbouring rows are independent with the exact marginals."""
    sampling = dict(temperature=1.0, top_k=3)
    a, b = [2, 1], [0, 3, 3, 1]
    ids = torch.tensor([[0, 0] + a, b]).repeat(SAMPLES // 2, 1)  # (SAMPLES, 4): rows a, b, a, b, ...
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]).repeat(SAMPLES // 2, 1)
    out = attnlab.speculative_generate(models["target"], models["between"], ids, N_NEW, gamma=GAMMA, seed=6,
                                       attention_mask=mask, **sampling)[:, 4:]
    law_a, seqs = exact_law(models["target"], a, N_NEW, **sampling)
    law_b, _ = exact_law(models["target"], b, N_NEW, **sampling)
    assert_exact(out[0::2], law_a, "rows of the 2-token prompt")
    assert_exact(out[1::2], law_b, "rows of the 4-token prompt")
    last_a = torch.zeros(V, dtype=torch.float64).index_add_(0, seqs[:, -1], law_a)  # (V,) exact marginal
    last_b = torch.zeros(V, dtype=torch.float64).index_add_(0, seqs[:, -1], law_b)
    pairs = out[0::2, -1] * V + out[1::2, -1]
    counts = torch.bincount(pairs, minlength=V * V)
    stat, df, p = chi_square(counts, (last_a[:, None] * last_b[None, :]).flatten())
    assert p >= ALPHA, f"last tokens of neighbouring rows: chi-square {stat:.1f} on {df} df, p = {p:.2e}"


def test_prompt_lookup_and_hybrid_sampling_are_exact(models):
    """Deterministic proposals (q one-hot) from prompt lookup, and the hybrid drafter switching sources: the
    prompt holds every bigram (0, x), so its first round is a lookup round for every row; later rows end
    in bigrams the text lacks and the draft model takes over (its cache catches up on the lookup tokens)."""
    from attnlab.inference.drafters import HybridDrafter

    sampling = dict(temperature=1.0)
    prompt = [0, 0, 1, 0, 2, 0, 3, 0]
    probs, _ = exact_law(models["target"], prompt, N_NEW, **sampling)
    x = torch.tensor([prompt]).repeat(SAMPLES // 2, 1)
    hybrid = HybridDrafter(models["between"], min_match=2)
    for seed, draft in ((7, "prompt_lookup"), (8, hybrid)):
        out = attnlab.speculative_generate(models["target"], draft, x, N_NEW, gamma=GAMMA, seed=seed, **sampling)
        assert_exact(out[:, len(prompt):], probs, f"draft {draft}")
    assert hybrid.lookup_rounds > 0 and hybrid.model_rounds > 0


@pytest.mark.parametrize("gamma", [2, 3, 4])
@pytest.mark.parametrize("n_new", [3, 5, 8])
def test_greedy_batches_whose_rows_finish_in_different_rounds(models, gamma, n_new):
    """Regression: a row whose accepted proposals ran past max_new_tokens kept them in the caches, and with
    its neighbours still drafting the target's cache outgrew its T + N + γ + 1 slots (ValueError)."""
    ids = torch.randint(0, V, (64, 3), generator=torch.Generator().manual_seed(gamma * 10 + n_new))
    expected = attnlab.generate(models["between"], ids, n_new)
    assert torch.equal(attnlab.speculative_generate(models["between"], models["target"], ids, n_new, gamma=gamma),
                       expected)
