"""Teacher-labelled data (``attnlab data teacher``) and the stored-label distillation task.

The stored text must be the teacher's own greedy continuation, every stored label the teacher's top-K at
that position (checked against one float64 forward over the whole stored sequence), an interrupted run
must continue to the same files, and the sparse loss must equal its formula.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab import ModelConfig, build_model
from attnlab.inference.generate import generate
from attnlab.tokenizer import train_bpe
from attnlab.training.distill import TeacherDataTask
from attnlab.training.teacher_data import TeacherSequences, build_teacher_data, label_batch

TEXT = ["def f(x):\n    return x + 1\n" * 6 + f"# file {i}\n" + "class A:\n    pass\n" * 4 for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXT, 300)


def teacher(vocab, seed=0, eos=None):
    torch.manual_seed(seed)
    m = build_model(ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                                eos_token_id=eos, tie_embeddings=False))
    with torch.no_grad():  # sharper logits than the init's near-flat ones: no near-ties to flip between paths
        m.lm_head.weight.mul_(30)
    return m.eval()


def test_labels_are_the_teachers_greedy_text_and_its_top_k_at_every_position():
    m = teacher(50)
    prompts = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    out = label_batch(m, prompts, new_tokens=9, k=5, stop_ids=set())
    assert out["ids"].shape == (3, 7 + 9 + 1) and out["topk_ids"].shape == (3, 16, 5)
    assert np.array_equal(out["ids"], generate(m, prompts, 10).numpy())  # the stored text is greedy decoding
    with torch.no_grad():
        ref = torch.log_softmax(copy.deepcopy(m).double()(torch.from_numpy(out["ids"][:, :-1]).long()), -1)  # (3, 16, V)
    top = ref.topk(5, -1)
    assert np.array_equal(out["topk_ids"], top.indices.numpy())
    assert np.allclose(out["topk_logp"].astype(np.float64), top.values.numpy(), rtol=1e-3, atol=2e-3)  # float16 storage
    assert (out["length"] == 16).all() and (out["prompt"] == 7).all()


def test_a_row_stops_at_its_first_generated_end_token():
    m = teacher(50)
    prompts = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(2))
    free = label_batch(m, prompts, new_tokens=12, k=3, stop_ids=set())
    stop = int(free["ids"][0, 6 + 4])  # row 0's fifth generated token plays the end token
    out = label_batch(m, prompts, new_tokens=12, k=3, stop_ids={stop})
    for b in range(4):
        gen = list(free["ids"][b, 6:18])
        expect = 6 + gen.index(stop) if stop in gen else 18
        assert out["length"][b] == expect
    assert out["length"][0] <= 6 + 4


def test_an_interrupted_run_continues_to_the_same_files_and_other_settings_are_refused(tmp_path, tok):
    m = teacher(tok.vocab_size)
    docs = {"train": TEXT[:8], "validation": TEXT[8:]}
    kw = dict(sequences={"train": 6, "validation": 2}, prompt_lengths=(8, 12), new_tokens=5, batch=2, k=4, seed=3,
              progress=False)
    build_teacher_data(m, tok, docs, tmp_path / "a", **kw)
    build_teacher_data(m, tok, docs, tmp_path / "b", **kw)
    (tmp_path / "b" / "train-00002.npz").unlink()  # the shard an interruption lost
    manifest = build_teacher_data(m, tok, docs, tmp_path / "b", **kw)
    assert manifest["sequences"] == {"train": 6, "validation": 2}
    for name in ("train-00000.npz", "train-00002.npz", "validation-00000.npz"):
        with np.load(tmp_path / "a" / name) as za, np.load(tmp_path / "b" / name) as zb:
            assert all(np.array_equal(za[key], zb[key]) for key in za.files)
    with pytest.raises(ValueError, match="other settings .*new_tokens"):
        build_teacher_data(m, tok, docs, tmp_path / "b", **{**kw, "new_tokens": 6})
    data = TeacherSequences(tmp_path / "a", "train")
    assert data.n == 6 and {len(r) for r in data.rows["topk_ids"]} == {8 + 5, 12 + 5}


def test_a_build_never_touches_another_writers_temporary_files(tmp_path, tok):
    """Every shard and the manifest are written under a unique temporary name: a second build of the same
    folder running at the same time (its half-written files planted here) is never clobbered or renamed."""
    m = teacher(tok.vocab_size)
    out = tmp_path / "t"
    out.mkdir()
    theirs = {out / ".train-00000.npz.tmp": b"half a shard", out / ".manifest.json.tmp": b"half a manifest"}
    for path, data in theirs.items():
        path.write_bytes(data)
    manifest = build_teacher_data(m, tok, {"train": TEXT}, out, sequences={"train": 2}, prompt_lengths=(8,),
                                  new_tokens=3, batch=2, k=4, progress=False)
    assert {path: path.read_bytes() for path in theirs} == theirs
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in theirs), "manifest.json", "train-00000.npz"])
    assert TeacherSequences(out, "train").n == manifest["sequences"]["train"] == 2


def test_unreadable_or_missing_data_is_named(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="attnlab data teacher"):
        TeacherSequences(tmp_path, "train")
    build_teacher_data(teacher(tok.vocab_size), tok, {"train": TEXT}, tmp_path, sequences={"train": 2},
                       prompt_lengths=(8,), new_tokens=3, batch=2, k=2, progress=False)
    with pytest.raises(ValueError, match="no validation shards"):
        TeacherSequences(tmp_path, "validation")
    (tmp_path / "train-00000.npz").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="train-00000.npz is not a readable .* remake it"):
        TeacherSequences(tmp_path, "train")


class Rows:
    """A TeacherSequences stand-in holding given rows (no files)."""

    def __init__(self, rows, k, vocab):
        self.rows, self.n = rows, len(rows["ids"])
        self.settings = {"k": k, "vocab_size": vocab, "teacher": "t"}

    gather = TeacherSequences.gather
    sample = TeacherSequences.sample
    fixed = TeacherSequences.fixed


def rows_from(m, prompts, new, k):
    out = label_batch(m, prompts, new, k, stop_ids=set())
    return {key: list(v) for key, v in out.items()}


def test_with_the_whole_vocabulary_the_loss_is_cross_entropy_to_the_teacher():
    vocab = 40
    t, s = teacher(vocab, seed=0), teacher(vocab, seed=1)
    prompts = torch.randint(0, vocab, (4, 6), generator=torch.Generator().manual_seed(4))
    rows = rows_from(t, prompts, 5, vocab)
    rows["length"][1] = 8  # row 1: positions 8.. are masked out
    task = TeacherDataTask(Rows(rows, vocab, vocab), Rows(rows, vocab, vocab), temperature=2.0)
    batch = task.train.gather([0, 1, 2, 3])
    loss, n = task.loss(s, batch)
    assert n == 3 * 11 + 8
    with torch.no_grad():
        q = F.log_softmax(s.double()(batch["x"]) / 2.0, -1)  # (B, L, V)
        p = torch.zeros_like(q).scatter_(-1, batch["topk_ids"], F.softmax(batch["topk_logp"].double() / 2.0, -1))
        ref = 4.0 * -(p * q).sum(-1)[batch["mask"]].mean()
    assert abs(float(loss.detach()) - float(ref)) < 1e-5


def test_the_teacher_as_its_own_student_agrees_everywhere_and_a_stranger_does_not():
    vocab = 40
    t = teacher(vocab)
    prompts = torch.randint(0, vocab, (8, 6), generator=torch.Generator().manual_seed(5))
    rows = rows_from(t, prompts, 10, 4)
    task = TeacherDataTask(Rows(rows, 4, vocab), Rows(rows, 4, vocab))
    same = task.evaluate_extra(copy.deepcopy(t))
    assert same == {"top1_agree": 1.0, "alpha_generated": 1.0}
    other = task.evaluate_extra(teacher(vocab, seed=7))
    assert other["alpha_generated"] < 0.5
    with pytest.raises(ValueError, match="vocabulary .*--tokenizer t"):
        task.check_student(teacher(vocab + 1))


def test_a_student_with_a_head_over_some_tokens_is_scored_over_those():
    vocab, k = 40, 6
    t = teacher(vocab)
    torch.manual_seed(2)
    s = build_model(ModelConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=128,
                                tie_embeddings=False, head_vocab_size=10))
    rows = rows_from(t, torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(6)), 6, k)
    data = Rows(rows, k, vocab)
    from attnlab.training.teacher_data import frequent_tokens

    head = frequent_tokens(data, 10, always=(39,))
    firsts = torch.from_numpy(np.concatenate([r[:, 0] for r in rows["topk_ids"]])).long()
    counts = torch.bincount(firsts, minlength=vocab)
    assert 39 in head.tolist() and head.tolist() == sorted(head.tolist())
    assert counts[head].sum() >= counts.sort(descending=True).values[:9].sum()  # the most frequent firsts kept
    s.head_token_ids.copy_(head)
    batch = data.gather([0, 1, 2])
    loss, n = TeacherDataTask(data, data).loss(s, batch)
    with torch.no_grad():
        q = F.log_softmax(s.double()(batch["x"], full_vocab=False), -1)  # (B, L, 10)
        total, count = 0.0, 0
        where = {tok: i for i, tok in enumerate(head.tolist())}
        for b in range(3):
            for pos in range(batch["x"].shape[1]):
                kept = [(where[int(tok)], float(lp)) for tok, lp in zip(batch["topk_ids"][b, pos],
                                                                        batch["topk_logp"][b, pos], strict=True)
                        if int(tok) in where]
                if not kept or not batch["mask"][b, pos]:
                    continue
                w = torch.softmax(torch.tensor([lp for _, lp in kept], dtype=torch.float64), 0)
                total -= float(sum(wi * q[b, pos, i] for wi, (i, _) in zip(w, kept, strict=True)))
                count += 1
    assert n == count and 0 < count < int(batch["mask"].sum())
    assert abs(float(loss.detach()) - total / count) < 1e-5


def test_the_commands_end_to_end_and_their_errors(tmp_path, capsys):
    import json

    from attnlab.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 3}) + "\n"
                              for i in range(120)))
    data = tmp_path / "teacher"
    base = ["data", "teacher", "--teacher", "default", "--data", str(corpus), "--out", str(data), "--train", "4",
            "--validation", "2", "--new-tokens", "4", "--batch", "2", "--prompt-lengths", "8", "--quiet"]
    assert main(base) == 0
    assert main(base[:-2] + ["8,x", "--quiet"]) == 2
    assert "--prompt-lengths '8,x'" in capsys.readouterr().err
    assert main(base[:-2] + ["9", "--quiet"]) == 2  # the folder was made with prompt length 8
    assert "other settings (prompt_lengths)" in capsys.readouterr().err
    run = ["train", "--preset", "tiny", "--teacher-data", str(data), "--steps", "2", "--quiet"]
    assert main(run + ["--tokenizer", "default", "--out", str(tmp_path / "r")]) == 0
    assert attnlab.from_pretrained(tmp_path / "r").config.vocab_size == 8192
    assert main(run + ["--tokenizer", "numbers", "--out", str(tmp_path / "r2")]) == 2
    assert "made with another tokenizer" in capsys.readouterr().err
    assert main(run + ["--distill", "default", "--out", str(tmp_path / "r3")]) == 2
    assert "choose one" in capsys.readouterr().err
