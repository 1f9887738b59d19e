"""``from_pretrained`` and ``load_tokenizer``: one entry point for every kind of checkpoint.

Resolves, in order: a shipped name ("default", "default-draft", ...), an attnlab model directory,
a local Hugging Face directory (safetensors only), or a GGUF file.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from attnlab.training.checkpoint import CONFIG_NAME, is_attnlab_dir, load_model

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
SHIPPED_GGUF = ("smollm2",)  # names that attnlab.interop.gguf.find_shipped_gguf resolves


def shipped_dir(name: str) -> Path:
    """The package-data directory of a shipped model, with a clear error if it is absent."""
    path = Path(str(resources.files("attnlab") / "assets" / SHIPPED[name]))
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"the shipped model {name!r} is not in this installation ({path}); "
            f"train it with `{HOW_TO_MAKE.get(name, f'attnlab train --preset {name}')}` or pass a model directory"
        )
    return path


def resolve_path(path_or_name: str | Path) -> Path:
    text = str(path_or_name)
    if text in SHIPPED:
        return shipped_dir(text)
    if text in SHIPPED_GGUF:  # a registry package that ships a GGUF file (clear error when absent)
        from attnlab.interop.gguf import find_shipped_gguf

        return find_shipped_gguf(text)
    path = Path(text).expanduser()
    if not path.exists():
        names = ", ".join(repr(n) for n in (*SHIPPED, *SHIPPED_GGUF))
        raise FileNotFoundError(f"no model at {text!r}: give a model directory, a .gguf file, or one of {names}")
    return path


def from_pretrained(path_or_name: str | Path, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load a model: shipped name, attnlab directory, Hugging Face directory or GGUF file."""
    path = resolve_path(path_or_name)
    if path.is_file():
        if path.suffix == ".gguf":
            from attnlab.interop import gguf

            return gguf.load_gguf(path, dtype=dtype)
        raise ValueError(f"{path} is a file; from_pretrained expects a model directory or a .gguf file")
    if is_attnlab_dir(path):
        return load_model(path, dtype=dtype)
    if (path / CONFIG_NAME).is_file():
        from attnlab.interop import hf

        return hf.load_hf(path, dtype=dtype)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        from attnlab.interop import gguf

        return gguf.load_gguf(ggufs[0], dtype=dtype)
    raise FileNotFoundError(
        f"{path} holds no {CONFIG_NAME} (attnlab or Hugging Face) and no single .gguf file; "
        f"it is not a model directory"
    )


class Tokenizer:
    """A thin wrapper over a Hugging Face ``tokenizers`` tokenizer.json."""

    def __init__(self, backend, *, eos_token: str | None = None, bos_token: str | None = None) -> None:
        self.backend = backend
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> None:
        self.backend.save(str(Path(directory) / "tokenizer.json"))


def load_tokenizer(path_or_name: str | Path) -> Tokenizer:
    """The tokenizer of a model directory (its tokenizer.json), or of a shipped name."""
    from tokenizers import Tokenizer as HFTokenizer

    path = resolve_path(path_or_name)
    if path.is_file() and path.suffix == ".gguf":
        from attnlab.interop import gguf

        return gguf.load_gguf_tokenizer(path)
    file = path if path.is_file() else path / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {path}; pass token ids instead (--prompt-ids) or add the tokenizer file"
        )
    try:
        backend = HFTokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{file} is not a valid tokenizer.json: {exc}") from None
    eos = bos = None
    special = path / "special_tokens.json" if path.is_dir() else None
    if special is not None and special.is_file():
        data = json.loads(special.read_text())
        eos, bos = data.get("eos_token"), data.get("bos_token")
    else:
        tok_cfg = path / "tokenizer_config.json" if path.is_dir() else None
        if tok_cfg is not None and tok_cfg.is_file():
            data = json.loads(tok_cfg.read_text())
            eos = data.get("eos_token") if isinstance(data.get("eos_token"), str) else None
            bos = data.get("bos_token") if isinstance(data.get("bos_token"), str) else None
    return Tokenizer(backend, eos_token=eos, bos_token=bos)
