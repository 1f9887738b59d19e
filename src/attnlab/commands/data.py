"""``attnlab data NAME``: build a data set on this machine. ``translation``: English -> Spanish verse pairs.

    attnlab data translation --out data/en-es [--vocab-size 8000] [--cache DIR]

fetches the Debian packages ``sword-text-web`` and ``sword-text-sparv`` once into the cache
(``$ATTNLAB_CACHE/translation`` or ``~/.cache/attnlab/translation``), then writes ``train.jsonl``,
``validation.jsonl``, ``test.jsonl``, ``tokenizer.json`` and ``manifest.json`` into ``--out``.
The same packages give the same files (the manifest's ``pairs_sha256`` says so).
"""

from __future__ import annotations

import sys

from attnlab.cli import parser

DATASETS = ("translation",)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: attnlab data NAME --out DIR [options]\ndata sets: {', '.join(DATASETS)}\n"
              f"`attnlab data NAME --help` shows its options")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(DATASETS)}")
    p = parser("attnlab data translation", "English -> Spanish Bible verse pairs (WEB / Reina-Valera 1909).")
    p.add_argument("--out", required=True, help="output folder for the pairs, the tokenizer and the manifest")
    p.add_argument("--vocab-size", type=int, default=8000, help="joint byte-level BPE vocabulary (default 8000)")
    p.add_argument("--cache", default=None, help="where the .deb files are kept (default: $ATTNLAB_CACHE/"
                                                 "translation or ~/.cache/attnlab/translation)")
    args = p.parse_args(rest)

    from attnlab.tasks.translation import build_dataset

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
