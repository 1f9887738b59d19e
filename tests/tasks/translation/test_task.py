import pytest
import torch

import attnlab
from attnlab import ModelConfig, build_model
from attnlab.inference.beam import beam_search
from attnlab.tasks.seq2seq_data import END, START, collate
from attnlab.tasks.translation.task import (
    build_translation_run,
    cross_attention,
    decode,
    load_data_tokenizer,
    score,
    sequence_logprob,
    translate,
)


@pytest.fixture(scope="module")
def tok(translation_data):
    return load_data_tokenizer(translation_data)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(3)
    cfg = ModelConfig(family="seq2seq", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_encoder_layers=1,
                      n_heads=4, n_kv_heads=2, d_ff=64, ffn="swiglu", norm="rms", norm_position="pre",
                      position="rope", max_seq_len=24, decoder_start_token_id=START, eos_token_id=END, pad_token_id=0,
                      init_std=0.3)
    return build_model(cfg).double().eval()


def sources(tok, texts):
    b = collate([(tok.encode(t), []) for t in texts])
    return b["src"], b["src_mask"]


TEXTS = ["the light of day", "and the king said to the woman", "water over earth", "night came", "the dark day"]


def test_beam_one_is_greedy(model, tok):
    src, mask = sources(tok, TEXTS)
    greedy = attnlab.generate(model, src, 12, attention_mask=mask, eos_token_id=END)
    rows = [r[: r.index(END) + 1] if END in r else r for r in greedy[:, 1:].tolist()]
    assert decode(model, src, mask, num_beams=1, max_new_tokens=12) == rows
    assert translate(model, tok, TEXTS, num_beams=1) == translate(model, tok, TEXTS)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wider_beams_never_score_lower_than_greedy(model, tok, length_penalty):
    """True by construction of ``keep_greedy`` (the default): beam search itself is tested against an
    exhaustive and a reference search in tests/inference/test_beam_reference.py."""
    src, mask = sources(tok, TEXTS)
    greedy = decode(model, src, mask, num_beams=1, max_new_tokens=12)
    lp_greedy = sequence_logprob(model, src, mask, greedy)
    for beams in (2, 3, 5):
        hyps = decode(model, src, mask, num_beams=beams, length_penalty=length_penalty, max_new_tokens=12)
        lp = sequence_logprob(model, src, mask, hyps)
        for h, g, s, sg in zip(hyps, greedy, lp, lp_greedy):
            assert score(s, len(h), length_penalty) >= score(sg, len(g), length_penalty) - 1e-9


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_keep_greedy_picks_the_better_of_greedy_and_beam(length_penalty):
    """``keep_greedy=False`` is beam_search's own result; ``True`` (the default) takes, row by row, the greedy
    hypothesis exactly where it scores higher than the beam's. A random 8-token model, where narrow beams
    often lose the greedy path (early stopping once K hypotheses have ended), so both branches are taken."""
    torch.manual_seed(0)
    cfg = ModelConfig(family="seq2seq", vocab_size=8, d_model=16, n_layers=1, n_encoder_layers=1, n_heads=2, d_ff=32,
                      max_seq_len=16, decoder_start_token_id=START, eos_token_id=END, pad_token_id=0, init_std=1.0)
    model = build_model(cfg).double().eval()
    src = torch.randint(3, 8, (40, 4), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(src)
    greedy = decode(model, src, mask, num_beams=1, max_new_tokens=8)
    lp_greedy = sequence_logprob(model, src, mask, greedy)
    taken = {"greedy": 0, "beam": 0}
    for beams in (2, 3):
        out = beam_search(model, src, 8, num_beams=beams, eos_token_id=END, attention_mask=mask,
                          length_penalty=length_penalty)
        alone = [r[: r.index(END) + 1] if END in r else r for r in out[:, 1:].tolist()]
        assert decode(model, src, mask, num_beams=beams, length_penalty=length_penalty, max_new_tokens=8,
                      keep_greedy=False) == alone
        lp = sequence_logprob(model, src, mask, alone)
        kept = decode(model, src, mask, num_beams=beams, length_penalty=length_penalty, max_new_tokens=8)
        for h, b, g, sb, sg in zip(kept, alone, greedy, lp, lp_greedy):
            greedy_wins = score(sg, len(g), length_penalty) > score(sb, len(b), length_penalty)
            assert h == (g if greedy_wins else b)
            taken["greedy" if greedy_wins else "beam"] += 1
    assert taken["greedy"] > 0 and taken["beam"] > 0


def test_beam_scores_equal_the_teacher_forced_log_probability(model, tok):
    """The cached, incremental beam scores against one full forward of the chosen hypothesis."""
    src, mask = sources(tok, TEXTS[:2])
    out, scores = beam_search(model, src, 10, num_beams=3, eos_token_id=END, attention_mask=mask, length_penalty=0.0,
                              return_scores=True)
    hyps = [r[: r.index(END) + 1] if END in r else r for r in out[:, 1:].tolist()]
    torch.testing.assert_close(torch.tensor(sequence_logprob(model, src, mask, hyps), dtype=torch.float64), scores)


@pytest.mark.parametrize("beams", [1, 3])
def test_a_batch_translates_like_one_text_at_a_time(model, tok, beams):
    assert translate(model, tok, TEXTS, num_beams=beams) == [translate(model, tok, t, num_beams=beams) for t in TEXTS]


def test_translate_edge_cases(model, tok):
    assert translate(model, tok, "") == "" and translate(model, tok, "   \n") == ""
    assert translate(model, tok, ["", "night came", ""])[::2] == ["", ""]
    odd = translate(model, tok, "Ωmega 😀 中文 \x00 \u200b", num_beams=2)  # unseen characters: their UTF-8 bytes
    assert isinstance(odd, str)
    long_text = " ".join(["the king said"] * 40)
    with pytest.warns(UserWarning, match="only its first 24 tokens"):
        out = translate(model, tok, long_text, num_beams=2)
    assert out == translate(model, tok, tok.decode(tok.encode(long_text)[:24]), num_beams=2)


def test_cross_attention_is_a_distribution_over_the_source(model, tok):
    src = tok.encode("the light of day")
    p = cross_attention(model, src, [5, 6, 7])
    assert p.shape == (4, len(src))
    torch.testing.assert_close(p.sum(-1), torch.ones(4, dtype=p.dtype))


def test_translation_task_batches_similar_lengths(translation_data):
    task, fields, _, info = build_translation_run(translation_data, {"max_seq_len": 32, "d_model": 32, "n_heads": 4,
                                                                     "d_ff": 64, "n_layers": 1, "n_encoder_layers": 1})
    assert fields["norm_position"] == "pre" and fields["n_kv_heads"] == 2 and fields["vocab_size"] <= 300
    assert "validation" in info
    g = torch.Generator().manual_seed(0)
    batch = task.train_batch(4, g)
    assert batch["src"].shape[0] == 4 and (batch["tgt_in"][:, 0] == START).all()
    torch.manual_seed(0)
    m = build_model(ModelConfig(**fields))
    loss, n = task.loss(m, batch)
    assert torch.isfinite(loss) and n == int(batch["tgt_mask"].sum())
    m.eval()
    assert 0.0 <= task.evaluate_extra(m)["bleu"] <= 100.0
    with pytest.raises(ValueError, match="needs --data"):
        build_translation_run(None, {})
