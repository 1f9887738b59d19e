"""Tour section: encoder (sees everything) vs decoder (causal) vs encoder-decoder with cross-attention.

Three measurements in one run: (1) which positions of an encoder and of a decoder change when one later
token changes; (2) an encoder-decoder trained on the built-in ``numbers`` task (English number words ->
digits), scored by exact match on the held-out test split, with and without its cross-attention; (3) the
cross-attention map of the trained model on a test example.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attnlab.tour.common import pick, plt, save
from attnlab.tour.report import Section
from attnlab.tour.verdict import combine, compare, exact


def _visibility(seed: int) -> dict[str, int]:
    """Change token 6 of 12; count the earlier positions (0..5) whose output moves."""
    from attnlab import ModelConfig, build_model

    torch.manual_seed(seed)
    ids = torch.randint(0, 50, (1, 12))
    other = ids.clone()
    other[0, 6] = (other[0, 6] + 1) % 50
    moved = {}
    for family in ("encoder", "decoder"):
        cfg = ModelConfig(family=family, vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16,
                          norm_position="post" if family == "encoder" else "pre")
        model = build_model(cfg).eval()
        with torch.no_grad():
            a, b = model(ids), model(other)
        moved[family] = int(((a - b).abs().amax(-1)[0, :6] > 1e-6).sum())
    return moved


def _train(steps: int, seed: int, out: Path):
    from tqdm import tqdm

    from attnlab.models import build_model
    from attnlab.tasks.seq2seq_data import build_task_run
    from attnlab.training.trainer import TrainConfig, Trainer

    task, fields, _, _ = build_task_run("numbers", {}, seed=seed)
    from attnlab.config import ModelConfig

    torch.manual_seed(seed)
    model = build_model(ModelConfig(**fields))
    cfg = TrainConfig(steps=steps, batch_size=64, lr=2e-3, warmup=min(100, steps // 10), eval_every=10 ** 9,
                      save_every=10 ** 9, seed=seed)
    trainer = Trainer(model, task, cfg, out / "seq2seq-run", progress=False, verbose=False)
    for _ in tqdm(range(steps), desc="seq2seq: training", leave=False, unit="step"):
        trainer.train_step()
    return model.eval()


def encoder_decoder(out: Path, mode: str, seed: int) -> Section:
    from attnlab.tasks.numbers import char_tokenizer
    from attnlab.tasks.seq2seq_data import cross_attention, exact_match, test_split

    s = Section("seq2seq", "Encoder vs decoder vs encoder-decoder (cross-attention)",
                "An encoder attends in both directions, a decoder only to the past; joining them with "
                "cross-attention (decoder queries, encoder keys/values) lets the output read the whole "
                "source, which is what translation-like tasks need.",
                "ModelConfig.family = encoder | decoder | seq2seq; blocks with cross=True in layers/stack.py")
    moved = _visibility(seed)
    from attnlab.hub import from_pretrained, shipped_dir

    try:  # the shipped model is optional: without it, a small one is trained here
        shipped_dir("numbers")
        shipped = True
    except FileNotFoundError:
        shipped = False
    if shipped:
        model, origin = from_pretrained("numbers"), "the shipped `numbers` model"
    else:
        steps = pick(mode, tiny=20, quick=250, full=1500)
        model, origin = _train(steps, seed, out), f"trained here for {steps} steps"
    test = test_split("numbers")[: pick(mode, tiny=40, quick=200, full=1000)]
    subsets = [test[i::4] for i in range(4)]  # four disjoint subsets: the spread of exact match between them
    em_parts = [exact_match(model, part) for part in subsets]
    em = sum(e * len(part) for e, part in zip(em_parts, subsets)) / len(test)
    blocks = model.decoder.blocks
    saved = [b.cross_attn.forward for b in blocks]
    for b in blocks:  # ablation: the cross-attention sublayer adds nothing to the residual stream
        b.cross_attn.forward = lambda x, **kw: torch.zeros_like(x)
    try:
        blind_parts = [exact_match(model, part) for part in subsets]
        em_blind = sum(e * len(part) for e, part in zip(blind_parts, subsets)) / len(test)
    finally:
        for b, f in zip(blocks, saved):
            b.cross_attn.forward = f
    tok = char_tokenizer()
    src_ids, tgt_ids = test[0]
    p = cross_attention(model, src_ids, tgt_ids)
    fig, ax = plt().subplots(figsize=(min(12, 2 + 0.25 * len(src_ids)), 3.2))
    ax.imshow(p.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(src_ids)), [tok.id_to_token(i) or "?" for i in src_ids], fontsize=7)
    ax.set_yticks(range(len(tgt_ids) + 1), ["<s>"] + [tok.id_to_token(i) or "?" for i in tgt_ids], fontsize=7)
    ax.set_xlabel("source (encoder)")
    ax.set_ylabel("decoder input")
    ax.set_title("cross-attention, last decoder layer (mean of heads)")
    s.figure = save(fig, out, "cross_attention.png")
    moved_what = "earlier outputs (of 6) that moved when token 6 changed"
    s.rows = [{"model": "encoder (bidirectional)", "measurement": moved_what, "value": moved["encoder"]},
              {"model": "decoder (causal)", "measurement": moved_what, "value": moved["decoder"]},
              {"model": f"encoder-decoder ({origin})", "measurement": "test exact match", "value": round(em, 4)},
              {"model": "same, cross-attention removed", "measurement": "test exact match", "value": round(em_blind, 4)}]
    s.measured = (f"an encoder and a decoder with random weights fed two inputs differing at token 6; an "
                  f"encoder-decoder ({origin}) on number words -> digits: exact match on {len(test)} held-out "
                  f"test examples, and again with its cross-attention removed")
    s.judge(combine(
        exact(moved["encoder"] == 6 and moved["decoder"] == 0,
              what="all 6 earlier encoder outputs move and no earlier decoder output does",
              detail=f"{moved['encoder']}/6 earlier encoder outputs moved vs {moved['decoder']}/6 decoder outputs"),
        compare(em_parts, blind_parts, claim="greater", threshold=0.2, names=("with cross-attention", "without"),
                what="test exact match", over="disjoint test subsets")))
    return s
