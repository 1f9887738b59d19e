"""Training state beside a checkpoint's model files: optimizer moments, RNG states, trainer counters.

Model directories themselves (config, weights, atomic writes) are ``attnlab.checkpoint``'s. Here:
``optimizer.safetensors`` (tensors) + the optimizer's scalars and the trainer's counters in
``trainer_state.json``, and ``rng.safetensors``. Nothing is unpickled. A damaged or hand-edited file is
refused with one ``ValueError`` naming the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from attnlab.atomic import atomic_write_file
from attnlab.checkpoint import (
    CONFIG_NAME,
    OPTIMIZER_FILE,
    RNG_FILE,
    STATE_FILE,
    WEIGHTS_NAME,
    read_json,
    read_weights,
)

CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)
STATE_KEYS = ("step", "best", "train_config", "world", "optimizer")


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


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], scalars: dict, source: Path) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise ValueError(f"{source / OPTIMIZER_FILE}: unexpected tensor {name!r}; the checkpoint is damaged")
        state.setdefault(int(parts[1]), {})[parts[2]] = t
    extra = scalars.get("state", {})
    if not isinstance(extra, dict) or not isinstance(scalars.get("param_groups"), list):
        raise ValueError(f"{source / STATE_FILE}: key 'optimizer' lacks 'param_groups' or 'state'; the checkpoint "
                         f"is damaged")
    for idx, values in extra.items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": scalars["param_groups"]}


def save_training_state(directory: Path, *, optimizer: torch.optim.Optimizer, rng: dict[str, torch.Tensor],
                        state: dict) -> None:
    """Write the optimizer, RNG and trainer state files into ``directory`` (each atomically)."""
    opt_tensors, opt_scalars = _flatten_optimizer(optimizer)
    rng = {k: v.contiguous() for k, v in rng.items()}
    atomic_write_file(directory / OPTIMIZER_FILE, lambda p: save_file(opt_tensors, str(p)))
    atomic_write_file(directory / RNG_FILE, lambda p: save_file(rng, str(p)))
    text = json.dumps({**state, "optimizer": opt_scalars}, indent=1, allow_nan=False) + "\n"
    atomic_write_file(directory / STATE_FILE, lambda p: p.write_text(text))


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds every file of a training checkpoint (a killed save leaves none of them
    under a ``step-*`` name, but a hand-damaged folder may lack some)."""
    return all((directory / n).is_file() for n in CHECKPOINT_FILES)


def load_training_state(directory: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(optimizer state_dict, rng tensors, trainer state) from a training checkpoint directory."""
    missing = [n for n in CHECKPOINT_FILES if not (directory / n).is_file()]
    if missing:
        raise ValueError(f"{directory} is not a complete training checkpoint (missing {missing})")
    state = read_json(directory / STATE_FILE, "the trainer's state")
    absent = [k for k in STATE_KEYS if k not in state]
    if absent:
        raise ValueError(f"{directory / STATE_FILE}: missing key(s) {absent}; the checkpoint is damaged")
    if not isinstance(state["optimizer"], dict):
        raise ValueError(f"{directory / STATE_FILE}: key 'optimizer' must be an object; the checkpoint is damaged")
    opt = _unflatten_optimizer(read_weights(directory / OPTIMIZER_FILE), state.pop("optimizer"), directory)
    return opt, read_weights(directory / RNG_FILE), state


def check_optimizer_state(opt_state: dict, optimizer: torch.optim.Optimizer, source: Path) -> None:
    """Every parameter's moments present and of its shape (``load_state_dict`` would accept wrong ones)."""
    groups = optimizer.param_groups
    saved = opt_state["param_groups"]
    if len(saved) != len(groups) or any(len(s.get("params", [])) != len(g["params"]) for s, g in zip(saved, groups)):
        raise ValueError(f"{source / STATE_FILE}: key 'optimizer.param_groups' does not match the model's "
                         f"parameters; the checkpoint is damaged or from another model")
    params = [p for g in groups for p in g["params"]]
    for index, p in enumerate(params):
        moments = opt_state["state"].get(index, {})
        for key in ("exp_avg", "exp_avg_sq"):
            t = moments.get(key)
            if t is None:
                raise ValueError(f"{source / OPTIMIZER_FILE}: tensor 'state.{index}.{key}' is missing; the "
                                 f"checkpoint is damaged")
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{source / OPTIMIZER_FILE}: tensor 'state.{index}.{key}' has shape "
                                 f"{tuple(t.shape)}, the parameter has {tuple(p.shape)}; the checkpoint is damaged")
