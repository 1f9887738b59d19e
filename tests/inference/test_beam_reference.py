"""``beam_search`` itself, against two independent references on a tiny vocabulary (V = 5, float64 models).

- Exhaustive search: every hypothesis of at most ``n`` tokens (one that stops early ends in EOS) scored by
  the beam's rule, sum log p / length ** length_penalty (EOS counted in the length), from one
  teacher-forced forward over all V^n continuations. A beam of V^(n-1) keeps every live prefix until the
  last step, where all candidates have the same length, so it must return the exact optimum.
- A plain-Python beam search, written here from the rule in inference/beam.py's docstring and fed by full
  (uncached) forwards: at each step the 2K best continuations of the live beams in order of summed log p;
  those ending in EOS among the first K ranks become finished hypotheses, the first K others the next
  beams; a row stops once it holds K finished; at the end the live beams compete too. For narrow beams
  (K = 1, 2, 3) the cached, batched ``beam_search`` must return the same tokens and the same score.

Checked by breaking ``beam_search`` on purpose (see the report of the change): normalising by the length
without EOS, letting EOS candidates of any of the 2K ranks finish, and keeping K - 1 beams per step each make
these tests fail.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from attnlab import ModelConfig, build_model
from attnlab.inference.beam import beam_search

V, EOS = 5, 0


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, init_std=0.5)
    return build_model(cfg).double().eval()


@pytest.fixture(scope="module")
def seq2seq():
    torch.manual_seed(5)
    cfg = ModelConfig(family="seq2seq", vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=32,
                      decoder_start_token_id=1, position="learned", init_std=0.5)
    return build_model(cfg).double().eval()


_SEEN: dict[tuple, list[float]] = {}  # (model, prompt, tokens) -> log p: the cases share their prefixes


def next_logp_fn(model, prompt: list[int]):
    """tokens so far -> (V,) float64 log p of the next token, by one full forward (no cache)."""
    seq2seq = model.config.family == "seq2seq"

    def next_logp(tokens: list[int]) -> list[float]:
        key = (id(model), tuple(prompt), tuple(tokens))
        if key not in _SEEN:
            with torch.no_grad():
                if seq2seq:
                    dec = torch.tensor([[model.config.decoder_start_token_id] + tokens])
                    logits = model(dec, encoder_input_ids=torch.tensor([prompt]))[0, -1]
                else:
                    logits = model(torch.tensor([prompt + tokens]))[0, -1]
            _SEEN[key] = torch.log_softmax(logits.double(), -1).tolist()
        return _SEEN[key]
    return next_logp


def reference_beam(next_logp, n: int, beams: int, length_penalty: float, eos: int | None) -> tuple[float, list[int]]:
    """(score, tokens) of the best hypothesis, by the rule in the module docstring."""
    def score(logp: float, length: int) -> float:
        return logp / (max(length, 1) ** length_penalty)

    live: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []
    for _ in range(n):
        candidates = []
        for total, toks in live:
            for tok, lp in enumerate(next_logp(toks)):
                candidates.append((total + lp, toks, tok))
        candidates.sort(key=lambda c: -c[0])
        live = []
        for rank, (total, toks, tok) in enumerate(candidates[: 2 * beams]):
            if tok == eos:
                if rank < beams:
                    finished.append((score(total, len(toks) + 1), toks + [tok]))
                continue
            live.append((total, toks + [tok]))
            if len(live) == beams:
                break
        if len(finished) >= beams:
            return max(finished, key=lambda h: h[0])
    finished += [(score(total, len(toks)), toks) for total, toks in live]
    return max(finished, key=lambda h: h[0])


@torch.no_grad()
def exhaustive_best(model, prompt: list[int], n: int, length_penalty: float, eos: int) -> tuple[float, list[int]]:
    """The best-scoring hypothesis of at most n tokens over all V^n continuations (one batched forward)."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n)))  # (S, n)
    S = len(seqs)
    if model.config.family == "seq2seq":
        start = torch.full((S, 1), model.config.decoder_start_token_id)
        logits = model(torch.cat([start, seqs[:, :-1]], 1), encoder_input_ids=torch.tensor([prompt]).repeat(S, 1))
    else:
        logits = model(torch.cat([torch.tensor([prompt]).repeat(S, 1), seqs[:, :-1]], 1))[:, len(prompt) - 1:]
    logp = torch.log_softmax(logits.double(), -1).gather(-1, seqs[..., None])[..., 0].cumsum(1)  # (S, n)
    best = (float("-inf"), [])
    for s, row in zip(seqs.tolist(), logp.tolist()):
        for length in range(1, n + 1):
            if eos in s[: length - 1]:
                break
            if length < n and s[length - 1] != eos:
                continue  # a hypothesis that stops early ends in EOS
            score = row[length - 1] / length ** length_penalty
            if score > best[0]:
                best = (score, s[:length])
    return best


def hypotheses(out: torch.Tensor, start: int, eos: int | None) -> list[list[int]]:
    rows = out[:, start:].tolist()
    return [r[: r.index(eos) + 1] if eos is not None and eos in r else r for r in rows]


PROMPTS = [[1, 3], [4, 2], [2, 2]]


@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("family", ["decoder", "seq2seq"])
def test_a_beam_wide_enough_finds_the_exhaustive_optimum(decoder, seq2seq, family, length_penalty):
    model, n = (decoder if family == "decoder" else seq2seq), 4
    out, scores = beam_search(model, torch.tensor(PROMPTS), n, num_beams=V ** (n - 1), eos_token_id=EOS,
                              length_penalty=length_penalty, return_scores=True)
    start = 2 if family == "decoder" else 1
    for row, prompt in enumerate(PROMPTS):
        expected_score, expected = exhaustive_best(model, prompt, n, length_penalty, EOS)
        assert hypotheses(out, start, EOS)[row] == expected
        assert abs(float(scores[row]) - expected_score) < 1e-9


NARROW = [(k, lp, EOS) for k in (1, 2, 3) for lp in (0.0, 1.0, 2.0)] + [(2, 1.0, None), (3, 1.0, None)]


@pytest.mark.parametrize("beams, length_penalty, eos", NARROW)
def test_narrow_beams_equal_a_reference_beam_search(decoder, beams, length_penalty, eos):
    """A batch of three prompts, one of them shorter and left-padded; each row against the reference."""
    prompts = [[1, 3, 4], [4, 2, 2], [2, 4]]
    ids = torch.tensor([prompts[0], prompts[1], [0] + prompts[2]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 1, 1]])
    n = 6
    out, scores = beam_search(decoder, ids, n, num_beams=beams, eos_token_id=eos, length_penalty=length_penalty,
                              attention_mask=mask, return_scores=True)
    got = hypotheses(out, 3, eos)
    for row, prompt in enumerate(prompts):
        expected_score, expected = reference_beam(next_logp_fn(decoder, prompt), n, beams, length_penalty, eos)
        assert got[row][: len(expected)] == expected and all(t == (eos or 0) for t in got[row][len(expected):])
        assert abs(float(scores[row]) - expected_score) < 1e-9


@pytest.mark.parametrize("beams", [2, 3])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_narrow_beams_equal_the_reference_for_seq2seq(seq2seq, beams, length_penalty):
    n = 6
    out, scores = beam_search(seq2seq, torch.tensor(PROMPTS), n, num_beams=beams, eos_token_id=EOS,
                              length_penalty=length_penalty, return_scores=True)
    got = hypotheses(out, 1, EOS)
    for row, prompt in enumerate(PROMPTS):
        expected_score, expected = reference_beam(next_logp_fn(seq2seq, prompt), n, beams, length_penalty, EOS)
        assert got[row][: len(expected)] == expected
        assert abs(float(scores[row]) - expected_score) < 1e-9


def test_the_reference_can_tell_beam_widths_apart(decoder):
    """The narrow-beam comparison has something to compare: on these prompts the widths disagree somewhere."""
    results = {k: [reference_beam(next_logp_fn(decoder, p), 6, k, 1.0, EOS)[1] for p in PROMPTS] for k in (1, 2, 3)}
    assert results[1] != results[2] or results[2] != results[3]
