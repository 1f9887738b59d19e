"""``attnlab bench translation``: sacreBLEU BLEU and chrF of a translation model on the held-out test books,
greedy and beam search side by side, plus a cross-attention alignment map of a few test sentences.

    attnlab bench translation --model runs/en-es [--data data/en-es] [--beam 4 | --beam 2,4,8] [--length-penalty 1.0]
                              [--limit N] [--out bench-out/translation]

``--data`` defaults to the data folder recorded in the model's ``task.json`` at training time. The test split
is every verse of the books listed in the data's manifest (``test_books``), none of which is in training.
Writes ``translation.json`` (scores, settings, a few translations) and ``cross_attention.png``: for each
sentence, the mean over heads of the last decoder layer's cross-attention, target tokens (rows) against
source tokens (columns), for the model's own greedy translation of the first test verses of 8-24 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from attnlab.bench.clock import Stopwatch
from attnlab.bench.common import machine, markdown_table, write_json
from attnlab.commands.args import parser
from attnlab.figures import save_figure


def _label(tokenizer, i: int) -> str:
    text = tokenizer.decode([i], skip_special_tokens=False)
    return (tokenizer.id_to_token(i) or "?") if "\ufffd" in text else text.strip() or "␣"


def draw_alignments(path: Path, model, tokenizer, sources: list[str]) -> None:
    """One heat map per source sentence: cross-attention of the greedy translation's tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from attnlab.tasks.seq2seq_data import END
    from attnlab.tasks.translation.task import cross_attention, decode

    fig, axes = plt.subplots(len(sources), 1, figsize=(10, 4.2 * len(sources)), squeeze=False)
    limit = model.config.max_seq_len
    for ax, text in zip(axes[:, 0], sources):
        src = tokenizer.encode(text)[:limit] or [END]
        hyp = decode(model, torch.tensor([src]), torch.ones(1, len(src), dtype=torch.long))[0]
        hyp = [t for t in hyp if t != END][: limit - 1]
        p = cross_attention(model, src, hyp)  # (T, S)
        ax.imshow(p.numpy(), aspect="auto", cmap="viridis", vmin=0)
        ax.set_xticks(range(len(src)), [_label(tokenizer, i) for i in src], fontsize=7, rotation=90)
        ax.set_yticks(range(len(hyp) + 1), ["<s>"] + [_label(tokenizer, i) for i in hyp], fontsize=7)
        ax.set_xlabel("English source tokens (encoder)")
        ax.set_ylabel("Spanish output (decoder input)")
    axes[0, 0].set_title("cross-attention, last decoder layer (mean of heads)")
    fig.tight_layout()
    save_figure(fig, path)


def draw_curves(path: Path, runs: list[str]) -> None:
    """Validation loss and BLEU against elapsed training time, one line per training run directory (read from
    its ``metrics.jsonl``; each evaluation is placed at the elapsed time of the training step it follows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnlab.checkpoint import CONFIG_NAME
    from attnlab.training.trainer import read_metrics

    fig, (ax_loss, ax_bleu) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in runs:
        if not (Path(run) / "metrics.jsonl").is_file():
            raise ValueError(f"--curves {run}: no metrics.jsonl there (a directory written by `attnlab train`)")
        records = read_metrics(run)
        elapsed = {r["step"]: r["elapsed_s"] for r in records if "elapsed_s" in r}
        evals = [r for r in records if r.get("split") == "validation" and r["step"] in elapsed]
        if not evals:
            raise ValueError(f"--curves {run}: metrics.jsonl has no validation records")
        config = Path(run) / CONFIG_NAME
        cfg = json.loads(config.read_text()) if config.is_file() else {}
        label = f"{Path(run).name} ({cfg.get('norm_position', '?')}-norm)"
        t = [elapsed[r["step"]] / 60 for r in evals]
        ax_loss.plot(t, [r["loss"] for r in evals], "o-", ms=3, label=label)
        ax_bleu.plot(t, [r.get("bleu", float("nan")) for r in evals], "o-", ms=3, label=label)
    ax_loss.set_ylabel("validation loss (label-smoothed)")
    ax_bleu.set_ylabel("validation BLEU (greedy, 64 verses)")
    for ax in (ax_loss, ax_bleu):
        ax.set_xlabel("training time (minutes)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str]) -> int:
    p = parser("attnlab bench translation", "BLEU/chrF on the test books, greedy vs beam; alignment map.")
    p.add_argument("--model", required=True, help="a translation model directory or translate-en-es")
    p.add_argument("--data", help="the `attnlab data translation` folder (default: the one the model was trained on)")
    p.add_argument("--beam", default="4", help="beam width(s) compared with greedy, comma-separated (default 4)")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=None, help="score only the first N test pairs")
    p.add_argument("--examples", type=int, default=3, help="test sentences in the cross-attention figure")
    p.add_argument("--out", default="bench-out/translation", help="folder for translation.json and the figure")
    p.add_argument("--curves", default=None,
                   help="comma-separated training run directories: also plot their learning curves (learning_curve.png)")
    args = p.parse_args(argv)
    try:
        widths = sorted({int(b) for b in str(args.beam).split(",") if b.strip()})
    except ValueError:
        raise ValueError(f"--beam {args.beam}: give whole numbers, comma-separated (e.g. 2,4,8)") from None
    if not widths or widths[0] < 2:
        raise ValueError(f"--beam {args.beam}: each width must be >= 2 (greedy is always scored)")

    from attnlab.checkpoint import TASK_FILE
    from attnlab.hub import from_pretrained, load_tokenizer, resolve_path
    from attnlab.tasks.translation.data import SOURCE, TARGET, load_split
    from attnlab.tasks.translation.task import evaluate

    model = from_pretrained(args.model).eval()
    tok = load_tokenizer(args.model)
    data = args.data
    task_file = resolve_path(args.model) / TASK_FILE
    if data is None and task_file.is_file():
        data = json.loads(task_file.read_text()).get("data")
    if data is None:
        raise ValueError("pass --data DIR (the folder made by `attnlab data translation --out DIR`)")
    pairs = [(r[SOURCE], r[TARGET]) for r in load_split(data, "test")][: args.limit]
    if not pairs:
        raise ValueError(f"{data}: the test split is empty")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, examples = [], {}
    for beams in (1, *widths):
        seconds, res = Stopwatch.call(lambda beams=beams: evaluate(model, tok, pairs, num_beams=beams,
                                                                  length_penalty=args.length_penalty))
        name = "greedy" if beams == 1 else f"beam {beams} (length penalty {args.length_penalty:g})"
        rows.append({"decoding": name, "BLEU": round(res["bleu"], 2), "chrF": round(res["chrf"], 2),
                     "sentences/s": round(len(pairs) / seconds, 2)})
        examples[name] = res["hypotheses"][:5]
    short = [s for s, _ in pairs if 8 <= len(tok.encode(s)) <= 24] or [s for s, _ in pairs]  # readable maps
    draw_alignments(out / "cross_attention.png", model, tok, short[: args.examples])
    if args.curves:
        draw_curves(out / "learning_curve.png", [r for r in args.curves.split(",") if r.strip()])
    print(f"test split of {data}: {len(pairs)} pairs, {model.num_parameters():,} parameters")
    print(markdown_table(rows, ["decoding", "BLEU", "chrF", "sentences/s"]))
    write_json(out / "translation.json", {"model": str(args.model), "data": str(data), "pairs": len(pairs),
                                          "rows": rows, "sources": [s for s, _ in pairs[:5]],
                                          "references": [r for _, r in pairs[:5]], "translations": examples,
                                          "machine": machine()})
    print(f"wrote {out / 'translation.json'} and {out / 'cross_attention.png'}")
    return 0
