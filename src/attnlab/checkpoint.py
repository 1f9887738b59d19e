"""Model directories on disk — the one owner of model I/O.

A model directory is ``config.json`` (the ``ModelConfig`` plus ``_attnlab_format``) and
``model.safetensors``, with optional tokenizer and task files beside them. Nothing is ever unpickled:
weights are safetensors, everything else is JSON.

Guarantees (tested in ``tests/reliability``):

- **Atomic.** A file is written under a temporary name, fsync'ed and renamed; a directory is filled as a
  temporary sibling and swapped in with one rename (``renameat2(RENAME_EXCHANGE)`` where Linux has it),
  so a crash at any moment leaves either the old directory or the new one, never a mix.
- **Never a foreign file.** A directory is replaced only when it is missing, empty, or holds nothing but
  files attnlab writes (an earlier model, or with ``overwrite=True`` a training run). Anything else is
  refused with a ``ValueError`` naming the entries in the way; a path that is a file is refused too.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from attnlab.atomic import (
    TMP_MARK,
    atomic_write_file,
    atomic_write_text,
    fsync_dir,
    fsync_file,
    pause_point,
    umask,
)
from attnlab.config import ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_KEY = "_attnlab_format"
FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"  # written by tokenizer.Tokenizer.save, with SPECIALS_FILE
SPECIALS_FILE = "special_tokens.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"  # a Hugging Face directory's tokenizer settings (convert once copied it)
TASK_FILE = "task.json"  # the task a seq2seq model solves
# what attnlab writes into a model directory (config and weights, tokenizer, the task a seq2seq model solves)
MODEL_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_FILE, SPECIALS_FILE, HF_TOKENIZER_CONFIG, TASK_FILE})
# what a training checkpoint adds (written by training/state.py), and what a training run keeps beside its
# model files (see training/trainer.py)
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
TRAINING_FILES = frozenset({OPTIMIZER_FILE, RNG_FILE, STATE_FILE})
RUN_ENTRIES = frozenset({"checkpoints", "best", "metrics.jsonl", "loss.png", "training.json"})
def finite(data: object) -> object:
    """``data`` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(data, float):
        return data if data == data and abs(data) != float("inf") else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def write_json(path: str | Path, data: object) -> Path:
    """Strict JSON (a NaN or infinity becomes null: they are not JSON), written atomically."""
    return atomic_write_text(path, json.dumps(finite(data), indent=1, allow_nan=False) + "\n")


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def entries_in_the_way(directory: Path, *, overwrite: bool = False) -> list[str]:
    """The entries of an existing ``directory`` that a model save must not replace (sorted names)."""
    allowed = MODEL_FILES | (TRAINING_FILES | RUN_ENTRIES if overwrite else frozenset())
    foreign = []
    for entry in directory.iterdir():
        if entry.name not in allowed or (entry.is_dir() != (entry.name in ("checkpoints", "best"))):
            foreign.append(entry.name)
    if not foreign and (directory / CONFIG_NAME).is_file() and not is_attnlab_dir(directory):
        foreign.append(f"{CONFIG_NAME} (not written by attnlab)")
    return sorted(foreign)


def check_target(directory: str | Path, *, overwrite: bool = False) -> Path:
    """Raise ``ValueError`` unless a model may be written at ``directory`` (see the module docstring)."""
    directory = Path(directory).expanduser().absolute()
    if directory.is_file() or (directory.exists() and not directory.is_dir()):
        raise ValueError(f"{directory} is a file, not a directory; choose another output directory")
    if directory.is_dir():
        foreign = entries_in_the_way(directory, overwrite=overwrite)
        if foreign:
            shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
            hint = ("" if overwrite or not set(foreign) <= TRAINING_FILES | RUN_ENTRIES
                    else "; pass overwrite=True (--overwrite) to replace this training run's files")
            raise ValueError(f"{directory} holds files attnlab did not write ({shown}); nothing was changed — "
                             f"choose an empty or new directory{hint}")
    return directory


def atomic_write_dir(directory: str | Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call ``write(tmp)`` to fill a temporary directory, then put it in place of ``directory``.

    Refuses (before writing anything) a ``directory`` that holds files attnlab did not write. Until the
    final swap the old ``directory`` is untouched; if ``write`` raises, the temporary one is removed.
    """
    directory = check_target(directory, overwrite=overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}{TMP_MARK}", dir=directory.parent))
    try:
        write(tmp)
        mask = umask()
        os.chmod(tmp, 0o755 & ~mask)  # mkdtemp makes it private; a model directory is ordinary readable data
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o644 & ~mask)
                fsync_file(f)
        fsync_dir(tmp)
        pause_point(f"dir:{directory}")
        check_target(directory, overwrite=overwrite)  # nothing foreign appeared while we wrote
        if not directory.exists():
            os.rename(tmp, directory)
        elif _exchange(tmp, directory):  # tmp now holds the old directory
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # no atomic swap here: old aside, new in (a crash between the two renames leaves the old aside)
            old = directory.parent / f".{directory.name}.old{TMP_MARK}{os.getpid()}"
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def clean_leftovers(directory: str | Path) -> list[Path]:
    """Remove the temporary files and folders that killed saves left in ``directory``; return them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        if entry.name.startswith(".") and TMP_MARK in entry.name:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


# ----------------------------------------------------------------------------- saving
def model_state(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors stored once (safetensors refuses shared storage)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    out = {}
    for name, t in state.items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous().cpu()
    return out


def check_saveable(model: torch.nn.Module) -> None:
    if model.stored_weights:
        raise ValueError(f"this model keeps its weights {model.stored_weights} (GGUF blocks, not parameters) and "
                         f"cannot be saved; load the file without precision='native' to save it")
    if model.prepared_for_decode:
        raise ValueError("this model was prepared for fast decoding (fused, packed or quantised weights) and "
                         "cannot be saved; save the original model instead")


def config_text(cfg: ModelConfig) -> str:
    data = cfg.to_dict()
    data[FORMAT_KEY] = FORMAT_VERSION
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_model_files(model: torch.nn.Module, directory: Path, *, dtype: torch.dtype | None = None) -> None:
    """``config.json`` and ``model.safetensors`` into an existing ``directory``, each file atomically
    (weights first: a crash between the two leaves the previous config, which describes the same shapes)."""
    check_saveable(model)
    state = model_state(model, dtype)
    atomic_write_file(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_NAME, config_text(model.config))


def save_model(model: torch.nn.Module, directory: str | Path, *, dtype: torch.dtype | None = None,
               extra_files: Callable[[Path], None] | None = None, overwrite: bool = False) -> Path:
    """Save ``model`` (config + weights, + whatever ``extra_files(dir)`` adds) as a model directory, atomically."""
    check_saveable(model)  # before anything is touched

    def write(tmp: Path) -> None:
        write_model_files(model, tmp, dtype=dtype)
        if extra_files is not None:
            extra_files(tmp)

    return atomic_write_dir(directory, write, overwrite=overwrite)


# ----------------------------------------------------------------------------- loading
def is_attnlab_dir(directory: Path) -> bool:
    cfg = Path(directory) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and FORMAT_KEY in data


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``, or one ``ValueError`` naming the file (``what``: what it should hold)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the file is damaged") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object ({what}), not {type(data).__name__}")
    return data


def read_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a model directory")
    data = read_json(path, "the model config")
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); the checkpoint is damaged") from None


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
                   "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Build a model without initialising its weights: ``torch.nn.init``'s fills become no-ops, so parameters
    stay ``torch.empty`` (pages never touched, never resident) until a loader assigns the real tensors
    (``load_state_checked(..., assign=True)``). Initialising SmolLM2-135M cost ~15% of its load. Not
    thread-safe: it patches ``torch.nn.init`` while the block runs."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def load_state_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, *,
                       assign: bool = False) -> None:
    """Copy ``state`` into ``model``, naming any missing, unexpected or mis-shaped tensor.

    ``assign=True`` makes ``state``'s tensors the model's parameters (no copy: memory-mapped weights stay
    mapped, in their own dtype); parameters shared under several names (tied embeddings) stay shared.
    """
    own = model.state_dict()
    tied = model.config.tie_embeddings
    expected = [k for k in own if not (tied and k == "lm_head.weight")]  # in module order
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor(s) {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for name in expected:
        if tuple(state[name].shape) != tuple(own[name].shape):
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                f"the config expects {tuple(own[name].shape)}"
            )
    if assign:
        _assign(model, {name: state[name] for name in expected})
        return
    with torch.no_grad():
        for name in expected:
            own[name].copy_(state[name].to(own[name].dtype))


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    model.load_state_dict(state, strict=False, assign=True)
    for names in aliases.values():
        source = next((n for n in names if n in state), None)
        if source is None or len(names) == 1:
            continue
        module, _, attr = source.rpartition(".")
        shared = getattr(model.get_submodule(module), attr)
        for other in names:
            if other != source:
                owner, _, other_attr = other.rpartition(".")
                setattr(model.get_submodule(owner), other_attr, shared)
