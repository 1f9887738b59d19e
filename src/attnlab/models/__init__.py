"""Model families. ``build_model(cfg)`` maps ``cfg.family`` to its class."""

from __future__ import annotations

from torch import nn

from attnlab.config import ModelConfig
from attnlab.models.base import AttnlabModel
from attnlab.models.decoder import DecoderLM

FAMILY_CLASSES: dict[str, type[AttnlabModel]] = {"decoder": DecoderLM}


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of the family ``cfg.family``."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"build_model expects an attnlab.ModelConfig, got {type(cfg).__name__}")
    cfg.validate()
    if cfg.family not in FAMILY_CLASSES:
        raise ValueError(f"family={cfg.family!r} has no model yet; available: {sorted(FAMILY_CLASSES)}")
    return FAMILY_CLASSES[cfg.family](cfg)


__all__ = ["AttnlabModel", "DecoderLM", "FAMILY_CLASSES", "build_model"]
