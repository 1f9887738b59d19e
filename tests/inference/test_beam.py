import itertools

import pytest
import torch

import attnlab
from attnlab import ModelConfig, build_model
from attnlab.inference.beam import beam_search


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=5, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, init_std=0.5)
    return build_model(cfg).double().eval()


def exhaustive_best(model, prompt, n, eos, length_penalty):
    """Score every continuation of up to n tokens (stopping at EOS) under the model; return the best."""
    best = (float("-inf"), None)
    V = model.config.vocab_size
    for length in range(1, n + 1):
        for seq in itertools.product(range(V), repeat=length):
            if eos in seq[:-1] or (length < n and seq[-1] != eos):
                continue  # an EOS ends a hypothesis; shorter ones must end with EOS
            ids = torch.tensor([prompt + list(seq)])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids[:, :-1]), -1)[0, len(prompt) - 1:]
            total = float(logp.gather(1, torch.tensor(seq)[:, None]).sum())
            score = total / (length ** length_penalty)
            if score > best[0]:
                best = (score, list(seq))
    return best


def test_beam_one_equals_greedy(model):
    ids = torch.randint(0, 5, (3, 4))
    assert torch.equal(beam_search(model, ids, 10, num_beams=1), attnlab.generate(model, ids, 10))
    out = beam_search(model, ids[:1], 10, num_beams=1, eos_token_id=2)
    greedy = attnlab.generate(model, ids[:1], 10, eos_token_id=2)
    assert out[0].tolist() == greedy[0].tolist()[: out.shape[1]]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_full_width_beam_finds_the_exhaustive_optimum(model, length_penalty):
    prompt, n, eos = [1, 3], 4, 0
    expected_score, expected = exhaustive_best(model, prompt, n, eos, length_penalty)
    out, scores = beam_search(model, torch.tensor([prompt]), n, num_beams=5 ** 3, eos_token_id=eos,
                              length_penalty=length_penalty, return_scores=True)
    got = out[0, 2:].tolist()
    got = got[: got.index(eos) + 1] if eos in got else got
    assert got == expected
    assert abs(float(scores[0]) - expected_score) < 1e-9


def test_beam_search_runs_for_seq2seq():
    torch.manual_seed(0)
    cfg = ModelConfig(family="seq2seq", vocab_size=20, d_model=32, n_layers=2, n_heads=4, max_seq_len=32,
                      decoder_start_token_id=1, norm_position="post", position="learned")
    model = build_model(cfg).eval()
    src = torch.randint(2, 20, (2, 7))
    one = beam_search(model, src, 8, num_beams=1)
    assert torch.equal(one, attnlab.generate(model, src, 8))
    four = beam_search(model, src, 8, num_beams=4)
    assert four.shape[0] == 2 and (four[:, 0] == 1).all()


def test_bad_beam_arguments(model):
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(model, [[1, 2]], 3, num_beams=0)
