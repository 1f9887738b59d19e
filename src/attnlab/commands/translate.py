"""``attnlab translate``: English -> Spanish with a translation model (a directory or ``translate-en-es``).

    attnlab translate --model translate-en-es "In the beginning was the Word." [--beam 4]
    echo "Hello." | attnlab translate --model runs/en-es -

Each text prints one line. An empty text prints an empty line; a text longer than the model's source context
is translated from its first ``max_seq_len`` tokens, with a warning on stderr.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

from attnlab.commands.args import add_no_prepare, parser


def main(argv: list[str]) -> int:
    p = parser("attnlab translate", "Translate English text to Spanish.")
    p.add_argument("--model", required=True, help="a translation model directory or the shipped translate-en-es")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to translate; '-' reads lines from stdin")
    p.add_argument("--beam", type=int, default=1, help="beam width (1 = greedy, the default)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = log p / length ** this (0 = raw log-probability)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: twice the source length + 10, within the model's context")
    add_no_prepare(p)
    args = p.parse_args(argv)
    if args.beam < 1:
        raise ValueError(f"--beam {args.beam}: give a beam width >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: give a number of tokens >= 1")
    from attnlab.textio import check_lines, check_text, lenient_stdin

    # the texts are read and checked (valid UTF-8) before the model loads
    texts: list[str] = []
    for i, t in enumerate(args.texts, start=1):
        texts.extend(check_lines(lenient_stdin(), "stdin") if t == "-" else [check_text(t, f"TEXT argument {i}")])

    from attnlab.hub import from_pretrained, load_tokenizer
    from attnlab.tasks.translation.task import translate

    model = from_pretrained(args.model)
    if model.config.family != "seq2seq":
        raise ValueError(f"{args.model} is a {model.config.family} model; translation needs an encoder-decoder")
    if args.max_new_tokens is not None and not 1 <= args.max_new_tokens < model.config.max_seq_len:
        raise ValueError(f"--max-new-tokens must be in [1, {model.config.max_seq_len - 1}] for this model")
    from attnlab.inference.fast import no_lazy_preparation, prepare_for_decode

    if not args.no_prepare:  # this process owns the model: fused projections and attnlab's kernels
        prepare_for_decode(model)
    tokenizer = load_tokenizer(args.model)
    with warnings.catch_warnings(record=True) as caught, \
            no_lazy_preparation() if args.no_prepare else contextlib.nullcontext():
        warnings.simplefilter("always")
        out = translate(model, tokenizer, texts, num_beams=args.beam, length_penalty=args.length_penalty,
                        max_new_tokens=args.max_new_tokens)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    for line in out:
        print(line)
    return 0
