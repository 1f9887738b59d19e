"""``attnlab data NAME``: build a data set on this machine.

``translation``: English -> Spanish verse pairs.

    attnlab data translation --out data/en-es [--vocab-size 8000] [--cache DIR]

fetches the Debian packages ``sword-text-web`` and ``sword-text-sparv`` once into the cache
(``$ATTNLAB_CACHE/translation`` or ``~/.cache/attnlab/translation``), then writes ``train.jsonl``,
``validation.jsonl``, ``test.jsonl``, ``tokenizer.json`` and ``manifest.json`` into ``--out``.
The same packages give the same files (the manifest's ``pairs_sha256`` says so).

``teacher``: a teacher's greedy continuations of prompts from a corpus, with its top-K next-token
log-probabilities at every position, for distilling a speculative draft (``training/teacher_data.py``)::

    attnlab data teacher --teacher smollm2 --out data/smollm2-teacher --train 2048 --validation 64
    attnlab train --preset smollm2-draft --tokenizer smollm2 --teacher-data data/smollm2-teacher --out runs/d

An interrupted run continues where it stopped when started again with the same options.
"""

from __future__ import annotations

import sys

from attnlab.commands.args import add_compile, add_precision, parser

DATASETS = ("translation", "teacher")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: attnlab data NAME --out DIR [options]\ndata sets: {', '.join(DATASETS)}\n"
              f"`attnlab data NAME --help` shows its options")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(DATASETS)}")
    if name == "teacher":
        return _teacher(rest)
    p = parser("attnlab data translation", "English -> Spanish Bible verse pairs (WEB / Reina-Valera 1909).")
    p.add_argument("--out", required=True, help="output folder for the pairs, the tokenizer and the manifest")
    p.add_argument("--vocab-size", type=int, default=8000, help="joint byte-level BPE vocabulary (default 8000)")
    p.add_argument("--cache", default=None, help="where the .deb files are kept (default: $ATTNLAB_CACHE/"
                                                 "translation or ~/.cache/attnlab/translation)")
    args = p.parse_args(rest)

    from attnlab.tasks.translation.data import build_dataset

    manifest = build_dataset(args.out, cache=args.cache, vocab_size=args.vocab_size)
    print(f"wrote {args.out}: pairs sha256 {manifest['pairs_sha256'][:16]}..., vocab "
          f"{manifest['tokenizer']['vocab_size']}", file=sys.stderr)
    for split, s in manifest["splits"].items():
        books = ", ".join(s["books"]) if len(s["books"]) < 10 else f"{len(s['books'])} books"
        print(f"  {split:<10} {s['pairs']:>6} pairs  {s['en_bytes'] / 1e6:5.2f} MB en  {s['es_bytes'] / 1e6:5.2f} MB es  "
              f"{s['en_tokens_mean']:5.1f}/{s['es_tokens_mean']:5.1f} tokens per pair (en/es)  {books}")
    a = manifest["alignment"]
    print(f"  dropped: {a['one_sided_or_empty']} one-sided or empty verses, {a['dropped_in_shifted_chapters']} in "
          f"{len(a['shifted_chapters'])} chapters numbered differently, {a['dropped_length_ratio']} by length ratio")
    return 0


def _teacher(argv: list[str]) -> int:
    p = parser("attnlab data teacher", "A teacher's greedy continuations with its top-K log-probabilities.")
    p.add_argument("--teacher", required=True, help="model directory, .gguf file or shipped name (e.g. smollm2)")
    p.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    p.add_argument("--data", default=None, help="corpus to cut prompts from (default: the built-in stdlib corpus)")
    p.add_argument("--train", type=int, default=2048, help="sequences from the training split")
    p.add_argument("--validation", type=int, default=64, help="sequences from the validation split")
    p.add_argument("--prompt-lengths", default="64,128", help="prompt lengths, one drawn per batch (comma-separated)")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens the teacher writes after each prompt")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--top-k", type=int, default=8, help="log-probabilities kept per position")
    add_precision(p, ("fp32", "bf16", "int8"), default="bf16", flag="--precision", help="the teacher's fast path")
    add_compile(p, help="compile the teacher's decode steps: static-shape graphs (the default mode), 'static-jit' "
                        "or 'dynamic' (see `attnlab generate --help`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        lengths = tuple(int(v) for v in args.prompt_lengths.split(","))
    except ValueError:
        raise ValueError(f"--prompt-lengths {args.prompt_lengths!r}: write integers separated by commas, e.g. 64,128") from None
    for name, value in (("--batch", args.batch), ("--top-k", args.top_k), ("--new-tokens", args.new_tokens),
                        ("--prompt-lengths", min(lengths))):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 (got {value})")
    if args.train < 0 or args.validation < 0:
        raise ValueError("--train and --validation count sequences: use 0 or more")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from attnlab.hub import from_pretrained, load_tokenizer
    from attnlab.inference.fast import prepare_for_decode
    from attnlab.training.corpus import load_corpus
    from attnlab.training.teacher_data import build_teacher_data

    teacher = from_pretrained(args.teacher)
    if max(lengths) + args.new_tokens + 1 > teacher.config.max_seq_len:
        raise ValueError(f"prompt {max(lengths)} + {args.new_tokens} new tokens exceed the teacher's context "
                         f"({teacher.config.max_seq_len})")
    teacher = prepare_for_decode(teacher, precision=args.precision,
                                 compile="static" if args.compile is True else args.compile)
    corpus = load_corpus(args.data)
    manifest = build_teacher_data(teacher, load_tokenizer(args.teacher), corpus.documents, args.out,
                                  sequences={"train": args.train, "validation": args.validation},
                                  prompt_lengths=lengths, new_tokens=args.new_tokens, batch=args.batch,
                                  k=args.top_k, seed=args.seed, teacher_name=args.teacher, progress=not args.quiet)
    print(f"wrote {args.out}: " + ", ".join(f"{n} {s} sequences" for s, n in manifest["sequences"].items()),
          file=sys.stderr)
    return 0
