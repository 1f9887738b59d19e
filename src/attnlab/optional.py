"""Importing parts of attnlab that may not exist in this version, with a clear error when they don't."""

from __future__ import annotations

import importlib
from types import ModuleType


def import_or_unavailable(module_name: str, what: str) -> ModuleType:
    """Import ``module_name``; if that very module is missing, raise ValueError("<what> is not available ...").

    A module that exists but fails to import (a missing dependency inside it) is a bug and propagates.
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ValueError(f"{what} is not available in this version of attnlab") from None
        raise
