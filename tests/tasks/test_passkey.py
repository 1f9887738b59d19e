import torch

from attnlab.tasks.passkey import DIGIT0, KEY, QUERY, VOCAB_SIZE, batch, make_example


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
