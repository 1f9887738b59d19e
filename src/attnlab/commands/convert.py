"""``attnlab convert --model PATH --kv-heads K --out DIR``: a checkpoint with fewer K/V heads (MHA -> GQA
-> MQA, by mean-pooling each group: ``attnlab.models.kv_heads``), written as a normal model directory with
the source's tokenizer (from a model directory or a GGUF file's metadata, written by ``Tokenizer.save``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from attnlab.commands.args import add_precision, parser, torch_dtype

if TYPE_CHECKING:
    from attnlab.tokenizer import Tokenizer


def check_out(out: Path, source: Path | None, model_name: str) -> None:
    """Refuse an ``--out`` whose writing would replace the current directory or the model being read.

    The model directory is written as a whole (atomically), so ``--out .`` or ``--out`` equal to the source
    (or to a folder holding either) would put the new model in place of what is there.
    """
    target = out.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise ValueError(f"--out {out} is the current directory (or holds it): the model directory would take its "
                         f"place; give a new directory name, e.g. --out {model_name.rstrip('/').split('/')[-1]}-gqa")
    src = None if source is None else source.expanduser().resolve()
    if src is not None and (target == src or target in src.parents):
        raise ValueError(f"--out {out} is the source model {model_name} (or holds it): converting in place would "
                         f"overwrite the weights being read; give another directory")
    if target.is_file():
        raise ValueError(f"--out {out} is a file; give a directory name for the converted model")


def source_tokenizer(source: Path) -> Tokenizer | None:
    """The tokenizer of the model at ``source`` (a resolved path): a GGUF file's, or a directory's; None for
    a directory that has no tokenizer file (a model used with token ids only)."""
    from attnlab.hub import load_tokenizer
    from attnlab.tokenizer import TOKENIZER_FILE

    if source.is_dir() and not (source / TOKENIZER_FILE).is_file():
        return None
    return load_tokenizer(source)


def main(argv: list[str]) -> int:
    p = parser("attnlab convert", "Convert a checkpoint to fewer KV heads (MHA -> GQA -> MQA).")
    p.add_argument("--model", required=True, help="model directory, .gguf file or shipped name")
    p.add_argument("--kv-heads", type=int, required=True, help="the new number of KV heads (divides the current)")
    p.add_argument("--out", required=True, help="output model directory (new, empty, or an earlier attnlab model)")
    p.add_argument("--overwrite", action="store_true",
                   help="also replace a training run's files in --out (never files attnlab did not write)")
    add_precision(p, ("fp32", "bf16", "fp16"), default=None,
                  help="storage precision of the written weights (default: the model's)")
    args = p.parse_args(argv)
    if args.kv_heads < 1:
        raise ValueError(f"--kv-heads {args.kv_heads}: give a number of KV heads >= 1")
    given = Path(args.model).expanduser()
    check_out(Path(args.out), given if given.exists() else None, args.model)  # before the model loads
    from attnlab.checkpoint import check_target, save_model

    check_target(args.out, overwrite=args.overwrite)  # foreign files in --out: refused before the model loads
    from attnlab.hub import from_pretrained, resolve_path
    from attnlab.models.kv_heads import to_kv_heads

    source = resolve_path(args.model)
    check_out(Path(args.out), source, args.model)  # a shipped name, resolved
    model = from_pretrained(source)
    tokenizer = source_tokenizer(source)
    before = model.config.n_kv_heads
    new = to_kv_heads(model, args.kv_heads)
    out = Path(args.out)
    # the model's own tokenizer goes along, in the same atomic write
    save_model(new, out, dtype=torch_dtype(args.dtype) if args.dtype else None,
               extra_files=tokenizer.save if tokenizer is not None else None, overwrite=args.overwrite)
    kv_old = model.config.kv_cache_bytes_per_token(4)
    kv_new = new.config.kv_cache_bytes_per_token(4)
    print(f"converted {args.model}: {before} -> {args.kv_heads} KV heads; KV cache {kv_old:,} -> {kv_new:,} "
          f"bytes/token (fp32); written to {out}")
    print(f"uptrain it with: attnlab train --init {out} ...")
    return 0
