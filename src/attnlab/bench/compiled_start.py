"""Compiled decoding from a fresh process: what the first compiled token costs, cold and warm, per compile mode.

    attnlab bench compiled-start --model smollm2 --precisions fp32 bf16 --new-tokens 32

For each precision and each mode — ``static`` (AOTInductor packages cached in ``$ATTNLAB_CACHE/graphs``,
``inference/aot.py``) and ``static-jit`` (``torch.compile`` in every process, inductor's on-disk cache in
``$TORCHINDUCTOR_CACHE_DIR``) — two processes run one after the other with the same, initially empty,
graph caches (a temporary ``ATTNLAB_CACHE`` that links the user's kernel and weight caches, and a temporary
``TORCHINDUCTOR_CACHE_DIR``): **cold** (the first, which compiles) and **warm** (the second). Each one
loads the model, prepares it, runs the chat prompt (eager prefill), then greedy decode steps, and reports
the seconds from launch to the first compiled token, what the first decode step cost (compiling or loading
its graph), decode tokens per second after it, its resident memory, and its tokens (the modes must agree).
An ``eager`` row (prepared, not compiled) gives the reference speed and tokens.

Rough by design: one run each, on whatever else the machine is doing (say so with the figures).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from attnlab.atomic import atomic_write_text
from attnlab.commands.args import COMPILE_MODES, DECODE, add_precision, parser, run_command

PRECISIONS = tuple(p for p in DECODE if p != "native")  # what a float model loaded by name is prepared at

_CHILD = """
import json, sys, time
launched = float(sys.argv[1]); spec = json.loads(sys.argv[2])
import torch, attnlab
from attnlab.bench.clock import Stopwatch
from attnlab.bench.peer import PROMPT
from attnlab.chat import render_chat
from attnlab.hub import load_tokenizer
from attnlab.inference.fast import prepare_for_decode
t = {"import": time.time() - launched}
model = attnlab.from_pretrained(spec["model"])
t["load"] = time.time() - launched
tok = load_tokenizer(spec["model"])
ids = torch.tensor([tok.encode(render_chat(tok.chat_template, [{"role": "user", "content": PROMPT}],
                                           bos_token=tok.bos_token, eos_token=tok.eos_token))])
model = prepare_for_decode(model, precision=spec["precision"], compile=spec["mode"] or False)
t["prepare"] = time.time() - launched
tokens = []
with torch.inference_mode():
    cache = model.new_cache(1, ids.shape[1] + spec["new_tokens"] + 1)
    logits = model(ids, cache=cache)[:, -1]
    t["prefill"] = time.time() - launched
    tokens.append(int(logits.argmax(-1)))
    with Stopwatch() as step:
        logits = model(torch.tensor([[tokens[-1]]]), cache=cache)[:, -1]
    t["first_step_s"] = step.seconds
    t["first_compiled_token"] = time.time() - launched
    tokens.append(int(logits.argmax(-1)))
    with Stopwatch() as clock:
        for _ in range(spec["new_tokens"] - 1):
            tokens.append(int(model(torch.tensor([[tokens[-1]]]), cache=cache)[:, -1].argmax(-1)))
    t["decode_tok_s"] = (spec["new_tokens"] - 1) / clock.seconds
with open("/proc/self/status") as f:
    t["rss_mb"] = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
s = model.static_decoder  # None unless a static mode ran
aot = None if s is None else s.aot
t.update(tokens=tokens, prompt_tokens=ids.shape[1], failed=None if s is None else s.failed,
         aot=None if aot is None else vars(aot.stats))
print(json.dumps(t))
"""


def run(spec: dict, env: dict) -> dict:
    launched = time.time()
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", _CHILD, repr(launched), json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-1500:]}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["stderr"] = [line for line in done.stderr.splitlines() if line.startswith("attnlab:")]
    return out


def main(argv: list[str]) -> int:
    p = parser("attnlab bench compiled-start", __doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    add_precision(p, PRECISIONS, default=["fp32", "bf16"], flag="--precisions", nargs="+",
                  help="precisions to prepare the model at (default fp32 bf16)")
    p.add_argument("--modes", nargs="+", choices=("eager", *COMPILE_MODES), default=["eager", "static", "static-jit"],
                   help="eager (prepared, not compiled) and the compile modes to start (default eager static "
                        "static-jit)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    from attnlab.cachedir import cache_dir

    rows = []
    for precision in args.precisions:
        for mode in args.modes:
            with tempfile.TemporaryDirectory(prefix="attnlab-compiled-start-") as tmp:
                root = Path(tmp)
                for part in ("kernels", "weights"):  # built once per machine: not what is measured here
                    if cache_dir(part).is_dir():
                        (root / part).symlink_to(cache_dir(part))
                env = {**os.environ, "ATTNLAB_CACHE": str(root), "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor")}
                spec = {"model": args.model, "precision": precision, "new_tokens": args.new_tokens,
                        "mode": None if mode == "eager" else mode}
                for start in ("cold", "warm") if mode != "eager" else ("eager",):
                    row = {"precision": precision, "mode": mode, "start": start, **run(spec, env)}
                    rows.append(row)
                    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                                      if k != "tokens"}), flush=True)
    for precision in args.precisions:
        same = {f"{r['mode']}/{r['start']}": r.get("tokens") for r in rows if r["precision"] == precision}
        ref = same.get("static-jit/cold")
        print(f"{precision}: tokens equal static-jit's: "
              + ", ".join(f"{k} {v == ref}" for k, v in same.items()), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":  # flag mistakes as `attnlab bench compiled-start` reports them: one error line
    sys.exit(run_command(main, sys.argv[1:]))
