"""attnlab: every idea of the Transformer field guide as a switchable, tested and measured component.

The public names load on first use (PEP 562), so that ``import attnlab`` — and the ``attnlab`` command,
which checks its flags before it needs PyTorch — starts without importing torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attnlab.config import ModelConfig
    from attnlab.hub import from_pretrained, load_tokenizer
    from attnlab.inference.fast import prepare_for_decode
    from attnlab.inference.generate import generate
    from attnlab.inference.speculative import speculative_generate
    from attnlab.models import build_model

from attnlab.version import __version__  # noqa: E402 (after the TYPE_CHECKING block)

_EXPORTS = {
    "ModelConfig": "attnlab.config",
    "build_model": "attnlab.models",
    "from_pretrained": "attnlab.hub",
    "generate": "attnlab.inference.generate",
    "load_tokenizer": "attnlab.hub",
    "prepare_for_decode": "attnlab.inference.fast",
    "speculative_generate": "attnlab.inference.speculative",
}

__all__ = ["ModelConfig", "build_model", "from_pretrained", "generate", "load_tokenizer", "prepare_for_decode",
           "speculative_generate", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # a submodule (attnlab.hub, attnlab.inference, ...): load what the eager package used to, so that
        # attnlab.inference.generate and the like resolve exactly as before
        for module in set(_EXPORTS.values()):
            importlib.import_module(module)
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'attnlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
