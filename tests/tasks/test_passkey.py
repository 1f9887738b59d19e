import pytest
import torch

from attnlab import ModelConfig, build_model
from attnlab.tasks.passkey import (
    BOS,
    DIGIT0,
    KEY,
    QUERY,
    VOCAB_SIZE,
    PasskeyTask,
    batch,
    make_example,
    retrieval_accuracy,
    window_prompt,
)


def test_examples_have_the_key_once_and_the_answer_at_the_end():
    gen = torch.Generator().manual_seed(0)
    for length in (30, 100, 1000):
        seq, key = make_example(length, gen)
        assert len(seq) == length and max(seq) < VOCAB_SIZE
        k = seq.index(KEY)
        assert seq[k + 1:k + 6] == key and seq[k + 6] == KEY
        assert seq[-6] == QUERY and seq[-5:] == key
        assert all(DIGIT0 <= t < DIGIT0 + 10 for t in key)


def test_depth_is_controllable_and_batches_mask_the_answer():
    gen = torch.Generator().manual_seed(0)
    early, _ = make_example(200, gen, depth=0.0)
    late, _ = make_example(200, gen, depth=1.0)
    assert early.index(KEY) == 1 and late.index(KEY) > 180
    ids, mask = batch(3, 64, gen)
    assert ids.shape == (3, 64) and mask.shape == (3, 63)
    assert torch.equal(ids[:, 1:][mask.bool()].view(3, 5), ids[:, -5:])


def test_window_prompt_keeps_the_tail_behind_a_bos():
    prompt = torch.arange(10, 30)[None].repeat(2, 1)
    cut = window_prompt(prompt, 8)
    assert cut.shape == (2, 8) and bool((cut[:, 0] == BOS).all()) and torch.equal(cut[:, 1:], prompt[:, -7:])
    assert window_prompt(prompt, 20) is prompt
    with pytest.raises(ValueError, match="window"):
        window_prompt(prompt, 1)


def test_retrieval_accuracy_batches_and_windows(monkeypatch):
    """With an oracle that copies the digits after an opening <key> it sees, accuracy is 1 for the whole prompt
    and, through a window, the share of examples whose opening <key> and digits the window shows."""
    import attnlab.inference.generate as g

    def oracle(model, prompt, n):
        rows = []
        for row in prompt.tolist():
            opening = [i for i, t in enumerate(row[:-1]) if t == KEY and DIGIT0 <= row[i + 1] < DIGIT0 + 10]
            found = row[opening[0] + 1:opening[0] + 1 + n] if opening else []
            rows.append(row + (found + [0] * n)[:n])
        return torch.tensor(rows)

    monkeypatch.setattr(g, "generate", oracle)
    assert retrieval_accuracy(None, 300, 13, seed=5, batch_size=4) == 1.0
    gen = torch.Generator().manual_seed(5)
    starts = [make_example(300, gen)[0].index(KEY) for _ in range(13)]
    visible = sum(295 - s <= 100 - 5 - 1 for s in starts) / 13  # the opening <key> and its digits in view
    assert 0 < visible < 1
    assert retrieval_accuracy(None, 300, 13, seed=5, window=100, batch_size=4) == visible


def test_task_loss_is_the_answer_digits_only():
    task = PasskeyTask(64, lengths=(32, 64))
    gen = torch.Generator().manual_seed(0)
    seen = {task.train_batch(3, gen)["ids"].shape[1] for _ in range(20)}
    assert seen == {32, 64}
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=VOCAB_SIZE, d_model=16, n_layers=1, n_heads=2, max_seq_len=64))
    b = task.eval_batches(5)[0]
    loss, n = task.loss(model, b)
    logits = model(b["ids"][:, :-1])[:, -5:]  # the positions that predict the 5 answer digits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["ids"][:, -5:].flatten())
    assert n == 25 and torch.allclose(loss, expected)
    with pytest.raises(ValueError, match="too short"):
        PasskeyTask(64, lengths=(8,))
