"""``attnlab bench faults``: a fault-injection soak of training — SIGKILL at random moments, resume, repeat.

A tiny training run (the ``tiny`` preset on a generated corpus, a checkpoint after every step, so much of
the run's time is spent saving) is started and killed with SIGKILL after a random delay, ``--kills`` times
(default 50); after each kill it is resumed (or restarted, when it died before its first checkpoint). After
every kill the soak checks what a user would rely on:

- the newest complete checkpoint loads;
- ``OUT`` is a loadable model directory with a tokenizer (once its first save finished);
and at the end of each run (a run that reaches its last step before the kills are used up is followed by
a fresh one):
- the final weights equal an uninterrupted run of the same steps, bit for bit;
- no temporary file or folder is left behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from attnlab.atomic import atomic_write_text
from attnlab.bench.clock import Stopwatch
from attnlab.bench.common import machine, write_json
from attnlab.commands.args import parser

TRAIN = ["--preset", "tiny", "--quiet", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4",
         "--eval-every", "5", "--save-every", "1", "--keep-last", "2"]


def make_corpus(root: Path) -> Path:
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i in range(12):
        atomic_write_text(corpus / f"mod{i}.py", "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(40)))
    return corpus


def command(corpus: Path, out: Path, steps: int, resume: bool) -> list[str]:
    return [sys.executable, "-m", "attnlab", "train", *TRAIN, "--data", str(corpus), "--steps", str(steps),
            "--out", str(out), *(["--resume"] if resume else [])]


def leftovers(out: Path) -> list[Path]:
    places = [out, out / "checkpoints"]
    return [p for d in places if d.is_dir() for p in d.iterdir() if ".tmp-" in p.name]


def newest(out: Path) -> Path | None:
    from attnlab.training.trainer import complete_checkpoints

    found = complete_checkpoints(out)
    return found[-1] if found else None


def check_after_kill(out: Path) -> list[str]:
    """What must hold after any kill (an empty list when it all does)."""
    import attnlab
    from attnlab.checkpoint import CONFIG_NAME

    problems = []
    last = newest(out)
    if last is not None:
        try:
            attnlab.from_pretrained(last)
            attnlab.load_tokenizer(last)
        except Exception as exc:  # noqa: BLE001 - any failure to load is what the soak reports
            problems.append(f"newest checkpoint {last.name} does not load: {exc}")
    if (out / CONFIG_NAME).is_file():
        try:
            attnlab.from_pretrained(out)
            attnlab.load_tokenizer(out)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"OUT does not load: {exc}")
    return problems


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    from attnlab.checkpoint import WEIGHTS_NAME

    x, y = load_file(str(a / WEIGHTS_NAME)), load_file(str(b / WEIGHTS_NAME))
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


def main(argv: list[str]) -> int:
    from tqdm import tqdm

    p = parser("attnlab bench faults", "Kill a tiny training run at random moments, resume it, check nothing "
                                       "was lost and the result equals an uninterrupted run.")
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--steps", type=int, default=40, help="steps of each run (a checkpoint after every step)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--out", default="bench_results/faults", help="working folder (runs, corpus, cache)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.kills < 1 or args.steps < 2:
        raise ValueError("--kills must be >= 1 and --steps >= 2")
    root = Path(args.out).absolute()
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"--out {root} is not empty; give a new folder (the soak writes several runs there)")
    corpus = make_corpus(root)
    env = {**os.environ, "ATTNLAB_CACHE": str(root / "cache")}
    env.pop("ATTNLAB_TEST_PAUSE", None)

    clock = Stopwatch()  # the uninterrupted reference, timed to place the kills
    proc = subprocess.Popen(command(corpus, root / "straight", args.steps, False), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = None
    while proc.poll() is None:
        if first is None and newest(root / "straight") is not None:
            first = clock.seconds
        time.sleep(0.05)
    if proc.returncode != 0:
        raise ValueError(f"the reference run failed: {proc.stderr.read().decode()[-500:]}")
    total = clock.seconds
    first = first or total / 2
    straight = newest(root / "straight")

    rng = random.Random(args.seed)
    kills, runs, problems, equal, moments = 0, [], [], 0, []
    bar = tqdm(total=args.kills, desc="kills", unit="kill")
    run_dir, resumed = root / "run-0", False
    while kills < args.kills:
        # from the end of start-up (the first checkpoint of the reference came `first` s after launch) to a third of
        # the training time later: most kills land while steps and saves run, a few during start-up
        delay = rng.uniform(0.9 * first, first + (total - first) / 3)
        proc = subprocess.Popen(command(corpus, run_dir, args.steps, resumed), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            bar.update(1)
            last = newest(run_dir)
            moments.append({"run": run_dir.name, "delay_s": round(delay, 2), "newest_step": int(last.name[5:]) if last
                            else None, "mid_save": bool(leftovers(run_dir))})  # a temporary copy was being written
            found = check_after_kill(run_dir)
            problems += [f"kill {kills}: {p}" for p in found]
            resumed = (run_dir / "checkpoints").is_dir()
            if not (last is not None and int(last.name[5:]) == args.steps):
                continue
            # killed after its last checkpoint (while writing its summary): finish it unkilled, so that the next
            # kills land in a fresh run's steps and saves rather than in this one's start-up again and again
            proc = subprocess.Popen(command(corpus, run_dir, args.steps, True), env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            proc.wait()
        if proc.returncode != 0:  # finished by itself: it must have succeeded
            problems.append(f"{run_dir.name}: the resumed run failed: {proc.stderr.read().decode()[-300:]}")
        result = {"run": run_dir.name, "equal": same_weights(newest(run_dir), straight),
                  "leftovers": [p.name for p in leftovers(run_dir)]}
        equal += result["equal"]
        runs.append(result)
        run_dir, resumed = root / f"run-{len(runs)}", False
    bar.close()
    if (run_dir / "checkpoints").is_dir() or run_dir.exists():  # the last run, killed: finish it and compare
        proc = subprocess.run(command(corpus, run_dir, args.steps, (run_dir / "checkpoints").is_dir()), env=env,
                              capture_output=True)
        if proc.returncode != 0:
            problems.append(f"{run_dir.name}: the final resume failed: {proc.stderr.decode()[-300:]}")
        else:
            result = {"run": run_dir.name, "equal": same_weights(newest(run_dir), straight),
                      "leftovers": [p.name for p in leftovers(run_dir)]}
            equal += result["equal"]
            runs.append(result)
    survived = args.kills - len({p.split(":")[0] for p in problems if p.startswith("kill")})
    summary = {"kills": args.kills, "kills_survived": survived, "runs": len(runs), "runs_equal": equal,
               "kills_before_first_checkpoint": sum(m["newest_step"] is None for m in moments),
               "kills_mid_save": sum(m["mid_save"] for m in moments),
               "leftovers": sum(len(r["leftovers"]) for r in runs), "problems": problems,
               "reference_seconds": round(total, 1), "first_checkpoint_seconds": round(first, 1)}
    print(f"kills survived: {survived}/{args.kills} ({summary['kills_mid_save']} in the middle of a save, "
          f"{summary['kills_before_first_checkpoint']} before a run's first checkpoint); runs equal to the "
          f"uninterrupted one: {equal}/{len(runs)}; temporary leftovers: {summary['leftovers']}")
    for problem in problems:
        print(f"  problem: {problem}")
    write_json(args.json, {"bench": "faults", "machine": machine(), "args": vars(args), "summary": summary,
                           "runs": runs, "kills": moments})
    return 0 if not problems and equal == len(runs) and not summary["leftovers"] else 1
