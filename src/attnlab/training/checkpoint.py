"""Model directories on disk: ``config.json`` + ``model.safetensors``, written atomically.

Nothing is ever unpickled: weights are safetensors, everything else is JSON. A directory is written
to a temporary sibling, fsync'ed, then renamed over the destination, so a crash mid-save leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from attnlab.config import ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_KEY = "_attnlab_format"
FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_dir(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary directory, then swap it in place of ``directory``.

    Until the final rename the old ``directory`` (if any) is untouched; if ``write`` raises, the
    temporary directory is removed and the old one stays.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model directory is ordinary readable data
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o644)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.rename(directory, old)
        os.rename(tmp, directory)
        _fsync_dir(directory.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def model_state(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors stored once (safetensors refuses shared storage)."""
    state = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    out = {}
    for name, t in state.items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous().cpu()
    return out


def save_model(model: torch.nn.Module, directory: str | Path, *, dtype: torch.dtype | None = None,
               extra_files: Callable[[Path], None] | None = None) -> Path:
    """Save ``model`` (config + weights) as an attnlab model directory, atomically."""
    cfg: ModelConfig = model.config
    if getattr(model, "prepared_for_decode", None):
        raise ValueError("this model was prepared for fast decoding (fused, packed or quantised weights) and "
                         "cannot be saved; save the original model instead")

    def write(tmp: Path) -> None:
        data = cfg.to_dict()
        data[FORMAT_KEY] = FORMAT_VERSION
        (tmp / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        save_file(model_state(model, dtype), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if extra_files is not None:
            extra_files(tmp)

    return atomic_write_dir(directory, write)


def is_attnlab_dir(directory: Path) -> bool:
    cfg = directory / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        return FORMAT_KEY in json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a model directory")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); the checkpoint is damaged") from None


def load_state_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``, naming any missing, unexpected or mis-shaped tensor."""
    own = model.state_dict()
    tied = getattr(model.config, "tie_embeddings", False)
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
    with torch.no_grad():
        for name in expected:
            own[name].copy_(state[name].to(own[name].dtype))


def load_model(directory: str | Path, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    from attnlab.models import build_model

    directory = Path(directory)
    cfg = read_config(directory)
    state = read_weights(directory / WEIGHTS_NAME)
    model = build_model(cfg)
    model.to(torch.float32 if dtype is None else dtype)  # weights stored in 16 bits are widened by default
    load_state_checked(model, state, str(directory / WEIGHTS_NAME))
    return model.eval()


# ----------------------------------------------------------------------------- training state
def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as tensors (safetensors) + JSON scalars — no pickling."""
    sd = opt.state_dict()
    tensors, scalars = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars["state"].setdefault(str(idx), {})[key] = value
    return tensors, scalars


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for idx, extra in scalars.get("state", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    return {"state": state, "param_groups": scalars["param_groups"]}


def save_training_state(directory: Path, *, optimizer: torch.optim.Optimizer, rng: dict[str, torch.Tensor],
                        state: dict) -> None:
    """Write optimizer.safetensors, rng.safetensors and trainer_state.json into ``directory``."""
    opt_tensors, opt_scalars = _flatten_optimizer(optimizer)
    save_file(opt_tensors, str(directory / "optimizer.safetensors"))
    save_file({k: v.contiguous() for k, v in rng.items()}, str(directory / "rng.safetensors"))
    (directory / "trainer_state.json").write_text(json.dumps({**state, "optimizer": opt_scalars}, indent=1) + "\n")


def load_training_state(directory: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(optimizer state_dict, rng tensors, trainer state) from a training checkpoint directory."""
    needed = ["optimizer.safetensors", "rng.safetensors", "trainer_state.json", CONFIG_NAME, WEIGHTS_NAME]
    missing = [n for n in needed if not (directory / n).is_file()]
    if missing:
        raise ValueError(f"{directory} is not a complete training checkpoint (missing {missing})")
    state = json.loads((directory / "trainer_state.json").read_text())
    opt = _unflatten_optimizer(read_weights(directory / "optimizer.safetensors"), state.pop("optimizer"))
    return opt, read_weights(directory / "rng.safetensors"), state
