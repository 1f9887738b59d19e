"""``attnlab convert --model PATH --kv-heads K --out DIR``: a checkpoint with fewer K/V heads (MHA -> GQA
-> MQA, by mean-pooling each group: ``attnlab.models.kv_heads``), written as a normal model directory with
the source's tokenizer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from attnlab.commands.args import add_precision, parser, torch_dtype


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

    check_out(Path(args.out), resolve_path(args.model), args.model)  # a shipped name, resolved
    model = from_pretrained(args.model)
    before = model.config.n_kv_heads
    new = to_kv_heads(model, args.kv_heads)
    out = Path(args.out)
    src = resolve_path(args.model)

    def tokenizer_files(tmp: Path) -> None:  # the model's own tokenizer goes along, in the same atomic write
        for extra in ("tokenizer.json", "special_tokens.json", "tokenizer_config.json"):
            if src.is_dir() and (src / extra).is_file():
                shutil.copy(src / extra, tmp / extra)

    save_model(new, out, dtype=torch_dtype(args.dtype) if args.dtype else None, extra_files=tokenizer_files,
               overwrite=args.overwrite)
    kv_old = model.config.kv_cache_bytes_per_token(4)
    kv_new = new.config.kv_cache_bytes_per_token(4)
    print(f"converted {args.model}: {before} -> {args.kv_heads} KV heads; KV cache {kv_old:,} -> {kv_new:,} "
          f"bytes/token (fp32); written to {out}")
    print(f"uptrain it with: attnlab train --init {out} ...")
    return 0
