"""What ``attnlab train --resume`` continues: the settings saved with the newest complete checkpoint.

Every checkpoint's ``trainer_state.json`` records, under ``"run"``, the command's settings: its flags
(data, task, tokenizer, ...), the model fields and the training settings they resolved to. A resumed run
takes all of them from there, so ``attnlab train --out DIR --resume`` is enough; a flag given again with a
different value is an error naming both values — except the few that only change *how long* or *how
often* (``RESUMABLE``: ``--steps``, ``--max-time``, ``--keep-last``, ``--save-every``, ``--eval-every``,
``log_every``), which may change. ``--steps`` moves the end of the learning-rate schedule.
"""

from __future__ import annotations

from pathlib import Path

from attnlab.atomic import TMP_MARK
from attnlab.checkpoint import entries_in_the_way, read_json
from attnlab.commands.args import ALIASES
from attnlab.training.state import STATE_FILE

RESUMABLE = frozenset({"steps", "max_time", "keep_last", "save_every", "eval_every", "log_every"})
# command-line flags that choose the run (not its length); --preset/--config/--set are compared through what
# they resolve to (model fields and training settings)
RUN_FLAGS = ("data", "task", "tokenizer", "init", "distill", "teacher_data", "distill_weight", "distill_temperature",
             "distill_init_embeddings", "distill_precision", "max_files", "context_parallel")
PATH_FLAGS = ("data", "tokenizer", "init", "distill", "teacher_data")
PARSER_DEFAULTS = {"distill_weight": 0.9, "distill_temperature": 1.0, "distill_init_embeddings": False,
                   "distill_precision": "fp32"}


def check_output(out: Path, *, resume: bool) -> Path | None:
    """Refuse an ``--out`` that training must not write into, before any work; return the checkpoint to
    resume from (None: start at step 0)."""
    from attnlab.training.trainer import complete_checkpoints

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory (new, empty, or an earlier run to --resume)")
    if out.is_dir():
        foreign = [n for n in entries_in_the_way(out, overwrite=True) if TMP_MARK not in n]
        if foreign:
            raise ValueError(f"--out {out} holds files attnlab did not write ({', '.join(foreign[:6])}); nothing was "
                             f"changed — choose a new or empty directory")
    found = complete_checkpoints(out)
    if resume and not (out / "checkpoints").is_dir():
        raise ValueError(f"--resume: nothing to resume in {out} (no checkpoints/); start without --resume")
    if found and not resume:
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it or choose another --out "
                         f"(nothing was overwritten)")
    return found[-1] if resume and found else None


def _normal(flag: str, value):
    """Paths compared (and stored) absolute, so a run resumes from any working directory."""
    if flag in PATH_FLAGS and value is not None and Path(str(value)).exists():
        return str(Path(str(value)).resolve())
    return value


def run_record(args, model_fields: dict, train: dict) -> dict:
    """The settings saved with every checkpoint (see the module docstring)."""
    return {"flags": {f: _normal(f, getattr(args, f)) for f in RUN_FLAGS},
            "model": dict(model_fields), "train": dict(train)}


def _given(args, flag: str) -> bool:
    value = getattr(args, flag)
    return value is not None and value != PARSER_DEFAULTS.get(flag, None) and value is not False


def resume_settings(checkpoint: Path, args, model_fields: dict, train: dict) -> tuple[dict, dict]:
    """(model fields, training settings) of the run in ``checkpoint``; ``args`` is updated to its flags.

    ``model_fields``/``train`` are what this command's flags resolved to: each key set there must agree
    with the saved value (or be in ``RESUMABLE``)."""
    state = read_json(checkpoint / STATE_FILE, "the trainer's state")
    saved = state.get("run")
    source = checkpoint / STATE_FILE
    if not isinstance(saved, dict):  # written before runs recorded their settings: the train config only
        saved = {"flags": {}, "model": dict(model_fields), "train": {**train, **state.get("train_config", {})}}
    try:
        flags, saved_model, saved_train = dict(saved["flags"]), dict(saved["model"]), dict(saved["train"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{source}: key 'run' lacks 'flags', 'model' or 'train'; the checkpoint is damaged") from None
    if isinstance(saved_train.get("save_dtype"), str):  # runs saved before the short names wrote "bfloat16"
        saved_train["save_dtype"] = ALIASES.get(saved_train["save_dtype"], saved_train["save_dtype"])
    conflicts = []
    for flag in RUN_FLAGS:
        if flag in flags and _given(args, flag) and _normal(flag, getattr(args, flag)) != flags[flag]:
            conflicts.append(f"--{flag.replace('_', '-')} {getattr(args, flag)!r} (the run has {flags[flag]!r})")
    for key, value in model_fields.items():
        if key in saved_model and saved_model[key] != value:
            conflicts.append(f"model field {key}={value!r} (the run has {saved_model[key]!r})")
    for key, value in train.items():
        if key not in RESUMABLE and key in saved_train and saved_train[key] != value:
            conflicts.append(f"{key}={value!r} (the run has {saved_train[key]!r})")
    if conflicts:
        raise ValueError(f"--resume: a different model config or settings than the run saved in {checkpoint}: "
                         f"{'; '.join(conflicts)}; "
                         f"drop those flags (a resumed run keeps its settings; only "
                         f"{', '.join(sorted(RESUMABLE))} may change)")
    for flag, value in flags.items():
        if flag in RUN_FLAGS:
            setattr(args, flag, value)
    return saved_model, {**saved_train, **{k: v for k, v in train.items() if k in RESUMABLE}}
