"""``attnlab bench precision``: what bf16 and int8 weight-only quantisation cost in quality.

Perplexity of a model on the built-in corpus's *test* split (files never trained on), at fp32 and at each
precision of the fast decode path (``attnlab.inference.fast``), on the same fixed windows; plus how often
the greedy next token agrees with fp32. The speed side of the trade is ``attnlab bench decode``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from attnlab.bench.common import machine, markdown_table, write_json
from attnlab.commands.args import parser


def test_windows(model_name: str, seq_len: int, n_windows: int, max_files: int | None) -> list[torch.Tensor]:
    from attnlab.hub import load_tokenizer
    from attnlab.training.corpus import load_corpus
    from attnlab.training.data import TokenWindows, build_shards

    shards = build_shards(load_corpus(None, max_files=max_files), load_tokenizer(model_name))
    return TokenWindows(shards["test"], seq_len, name="test").fixed(n_windows)


@torch.inference_mode()
def evaluate(model, windows: list[torch.Tensor], reference: list[torch.Tensor] | None = None,
             label: str = "") -> tuple[float, float, list[torch.Tensor]]:
    """(nats per token, greedy agreement with ``reference`` argmaxes, this model's argmaxes)."""
    total, count, agree, argmaxes = 0.0, 0, 0, []
    for i, w in enumerate(tqdm(windows, desc=f"perplexity {label}", leave=False)):
        logits = model(w[:, :-1]).float()  # (1, T, V)
        total += float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
        count += w.shape[1] - 1
        top = logits.argmax(-1)
        argmaxes.append(top)
        if reference is not None:
            agree += int((top == reference[i]).sum())
    return total / count, (agree / count if reference is not None else 1.0), argmaxes


def run(model_name: str = "default", seq_len: int = 256, n_windows: int = 64,
        max_files: int | None = None) -> list[dict]:
    import attnlab
    from attnlab.inference.fast import PRECISIONS, prepare_for_decode, weight_bytes

    base = attnlab.from_pretrained(model_name).eval()
    windows = test_windows(model_name, seq_len, n_windows, max_files)
    rows, ref = [], None
    for precision in PRECISIONS:
        model = prepare_for_decode(copy.deepcopy(base), precision=precision)
        nats, agree, top = evaluate(model, windows, ref, precision)
        ref = top if ref is None else ref
        rows.append({"model": model_name, "precision": precision, "weight_MB": weight_bytes(model) / 1e6,
                     "nats_per_token": nats, "perplexity": math.exp(nats), "argmax_agree": agree})
    for r in rows:
        r["ppl_vs_fp32"] = r["perplexity"] / rows[0]["perplexity"] - 1.0
    return rows


def main(argv: list[str]) -> int:
    p = parser("attnlab bench precision", "Perplexity cost of bf16 and int8 weights on the corpus's test split.")
    p.add_argument("--model", default="default", help="model directory or shipped name (its tokenizer is used)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=64, help="fixed test windows scored")
    p.add_argument("--max-files", type=int, default=None, help="use only this many corpus files (for quick runs)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = run(args.model, args.seq_len, args.windows, args.max_files)
    print(f"machine: {machine()}")
    print(markdown_table(rows, ["model", "precision", "weight_MB", "nats_per_token", "perplexity", "ppl_vs_fp32",
                                "argmax_agree"]))
    write_json(args.json, {"machine": machine(), "rows": rows})
    return 0
