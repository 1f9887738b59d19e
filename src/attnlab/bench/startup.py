"""``attnlab bench startup``: seconds from launching a fresh process to its first token, attnlab vs llama.cpp.

    attnlab bench startup --repeats 3 --out runs/bench-startup

Per repeat, in a new empty cache directory (``$ATTNLAB_CACHE``, and PyTorch's compile cache
``$TORCHINDUCTOR_CACHE_DIR`` beside it, so that nothing from an earlier run is reused):

- **cold**: ``attnlab generate --model smollm2 --chat MESSAGE --max-new-tokens 1`` (``python -m attnlab``),
  timed from just before the launch to the first byte on its stdout (the streamed token), and to its exit;
- **warm**: the same command again, same cache directory;
- **llama.cpp**: a fresh process that imports llama_cpp, loads the shipped GGUF (2 threads by default),
  tokenises the same chat text and prints the first greedy token, timed the same way (its first and second
  run: only the OS page cache differs);
- **phases** (first repeat): where attnlab's time goes, from a probe process that runs the CLI's steps one by
  one and stamps each (interpreter start, ``import`` of the generate command, ``from_pretrained``,
  tokenizer, first token of ``chat_once``), cold then warm. Lines ``[startup] NAME SECONDS`` that the CLI
  itself prints on stderr when ``ATTNLAB_TRACE_STARTUP=1`` (set for every run) are collected too.

Each figure is the median over repeats. Issue 28's targets: warm ≤ 3 s, cold ≤ 30 s with progress shown.
"""

from __future__ import annotations

import datetime
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from attnlab.bench import peer_report as rep
from attnlab.bench.clock import Stopwatch
from attnlab.bench.common import markdown_table

_PROBE = """
import json, sys, time
t = {"started": time.time()}
def stamp(name):
    t[name] = time.time()
import attnlab.commands.generate
stamp("import")
import torch
stamp("torch")
import attnlab
model = attnlab.from_pretrained(sys.argv[1])
stamp("load")
from attnlab.hub import load_tokenizer
tok = load_tokenizer(sys.argv[1])
stamp("tokenizer")
from attnlab.chat import chat_once
chat_once(model, tok, sys.argv[2], max_new_tokens=1, stream=lambda s: t.setdefault("first_token", time.time()))
t.setdefault("first_token", time.time())
print(json.dumps(t), flush=True)
"""

_LLAMA = """
import sys, numpy as np
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_threads=int(sys.argv[3]), n_threads_batch=int(sys.argv[3]),
                      n_ctx=512, verbose=False)
ids = llm.tokenize(sys.argv[2].encode(), add_bos=False, special=True)
llm.eval(ids)
logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
sys.stdout.write(llm.detokenize([int(logits.argmax())]).decode(errors="replace") or "?")
sys.stdout.flush()
"""


def time_to_first_output(cmd: list[str], env: dict[str, str], timeout: float) -> dict:
    """Launch ``cmd``; seconds to the first byte on its stdout and to its exit, its exit code, its stdout and
    any ``[startup] NAME SECONDS`` lines of its stderr."""
    clock, wall = Stopwatch(), time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first, out = None, b""
    fd = proc.stdout.fileno()
    while True:
        left = timeout - clock.seconds
        if left <= 0:
            proc.kill()
            proc.wait()
            return {"error": f"timed out after {timeout:.0f} s", "launched": wall}
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        if first is None:
            first = clock.seconds
        out += chunk
    err = proc.stderr.read().decode(errors="replace")
    code = proc.wait()
    result = {"first_output_s": first, "exit_s": clock.seconds, "returncode": code, "launched": wall,
              "stdout": out.decode(errors="replace"),
              "trace": {p[1]: float(p[2]) for p in (ln.split() for ln in err.splitlines())
                        if len(p) == 3 and p[0] == "[startup]" and _is_number(p[2])}}
    if code != 0:
        result["error"] = f"exit {code}: " + " / ".join(err.strip().splitlines()[-3:])
    return result


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def fresh_env(cache: Path) -> dict[str, str]:
    """The environment of a run whose caches all live under ``cache`` (empty the first time)."""
    return {**os.environ, "ATTNLAB_CACHE": str(cache / "attnlab"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
            "PYTHONUNBUFFERED": "1", "ATTNLAB_TRACE_STARTUP": "1"}


def phases(stamps: dict, launched: float) -> dict:
    """Seconds spent in each step of the probe, from its stamps (time.time()) and the launch moment."""
    order = ["started", "import", "torch", "load", "tokenizer", "first_token"]
    names = {"started": "interpreter start", "import": "import attnlab generate", "torch": "import torch",
             "load": "from_pretrained",
             "tokenizer": "tokenizer", "first_token": "first token (incl. any preparation)"}
    out, before = {}, launched
    for key in order:
        if key in stamps:
            out[names[key]] = stamps[key] - before
            before = stamps[key]
    out["total"] = before - launched
    return out


def main(argv: list[str]) -> int:
    from attnlab.commands.args import parser

    p = parser("attnlab bench startup", "Launch-to-first-token time of `attnlab generate --chat`, cold and warm, "
                                        "vs llama.cpp loading its GGUF.")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="smollm2", help="the shipped GGUF name (default smollm2)")
    p.add_argument("--message", default="Hi")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    p.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    p.add_argument("--no-phases", action="store_true", help="skip the phase probe")
    p.add_argument("--timeout", type=float, default=900, help="seconds one launch may take")
    p.add_argument("--out", default="runs/bench-startup", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats}: give at least 1")
    import importlib.util

    from attnlab.hub import find_shipped_gguf, load_tokenizer

    gguf = find_shipped_gguf(args.model)
    llama = not args.no_llama
    if llama and importlib.util.find_spec("llama_cpp") is None:
        from attnlab.bench.peer import INSTALL

        raise ValueError(INSTALL.replace("bench peer", "bench startup") + " (or pass --no-llama)")
    from attnlab.chat import render_chat

    tok = load_tokenizer(gguf)
    chat_text = render_chat(tok.chat_template, [{"role": "user", "content": args.message}],
                            bos_token=tok.bos_token, eos_token=tok.eos_token)
    cli = [sys.executable, "-m", "attnlab", "generate", "--model", args.model, "--chat", args.message,
           "--max-new-tokens", "1"]
    runs: dict[str, list[dict]] = {"attnlab cold": [], "attnlab warm": [], "llama.cpp first": [], "llama.cpp second": []}
    probe: dict[str, dict] = {}
    from tqdm.auto import tqdm

    steps = args.repeats * (2 + 2 * llama) + (0 if args.no_phases else 2)
    progress = tqdm(total=steps, desc="bench startup", unit="launch")
    with tempfile.TemporaryDirectory(prefix="attnlab-startup-") as tmp:
        for r in range(args.repeats):
            env = fresh_env(Path(tmp) / f"repeat{r}")
            for name in ("attnlab cold", "attnlab warm"):
                progress.set_postfix_str(name)
                runs[name].append(time_to_first_output(cli, env, args.timeout))
                progress.update()
            if llama:
                for name in ("llama.cpp first", "llama.cpp second"):
                    progress.set_postfix_str(name)
                    runs[name].append(time_to_first_output(
                        [sys.executable, "-c", _LLAMA, str(gguf), chat_text, str(args.threads)], env, args.timeout))
                    progress.update()
        if not args.no_phases:
            env = fresh_env(Path(tmp) / "probe")
            for name in ("cold", "warm"):
                progress.set_postfix_str(f"phases {name}")
                done = time_to_first_output([sys.executable, "-c", _PROBE, args.model, args.message], env, args.timeout)
                probe[name] = ({"error": done["error"]} if "error" in done else
                               phases(json.loads(done["stdout"].strip().splitlines()[-1]), done["launched"]))
                progress.update()
    progress.close()
    return report(runs, probe, args, cli)


def report(runs: dict[str, list[dict]], probe: dict[str, dict], args, cli: list[str]) -> int:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = rep.cpu_description() | {"date": when}
    rows = []
    for name, results in runs.items():
        if not results:
            continue
        ok = [r for r in results if "error" not in r]
        rows.append({"run": name, "first_token_s": rep.median([r["first_output_s"] for r in ok]),
                     "exit_s": rep.median([r["exit_s"] for r in ok]),
                     "all_first_token_s": ", ".join(f"{r['first_output_s']:.2f}" for r in ok),
                     "repeats": len(ok), "error": next((r["error"] for r in results if "error" in r), None)})
        traces = [r["trace"] for r in ok if r.get("trace")]
        if traces:
            rows[-1]["cli_trace"] = {k: rep.median([t.get(k) for t in traces]) for k in traces[0]}
    command = " ".join(["attnlab", *cli[3:]])
    text = (f"# attnlab bench startup\n\n{machine['cpu']} ({', '.join(machine['isa'])}), {machine['cores']} cores, "
            f"{when}; `{command}` in a fresh process, median of {args.repeats}; cold = empty $ATTNLAB_CACHE and "
            f"$TORCHINDUCTOR_CACHE_DIR\n\n"
            + markdown_table(rows, [("run", "run"), ("first_token_s", "launch to first token s"), ("exit_s", "to exit s"),
                                  ("all_first_token_s", "each repeat"), ("error", "error")], missing="—"))
    for name, ph in probe.items():
        text += f"\n\nWhere attnlab's time goes ({name}, probe of the CLI's steps):\n\n" + markdown_table(
            [{"phase": k, "s": v} for k, v in ph.items()], [("phase", "phase"), ("s", "seconds")], missing="—")
    traced = [r for r in rows if r.get("cli_trace")]
    for r in traced:
        text += f"\n\nThe CLI's own trace ({r['run']}, ATTNLAB_TRACE_STARTUP=1): " + ", ".join(
            f"{k} {v:.2f} s" for k, v in r["cli_trace"].items())
    print(text)
    out = Path(args.out)
    rep.write_json_atomic(out.with_suffix(".json"), {"machine": machine, "command": command, "rows": rows,
                                                     "phases": probe, "runs": runs})
    rep.write_atomic(out.with_suffix(".md"), text + "\n")
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}")
    return 1 if any(r["error"] for r in rows) or any("error" in ph for ph in probe.values()) else 0
