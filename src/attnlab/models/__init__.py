"""Model families. ``build_model(cfg)`` maps ``cfg.family`` to its class."""

from __future__ import annotations

import importlib

from torch import nn

from attnlab.config import ModelConfig
from attnlab.models.base import AttnlabModel
from attnlab.models.decoder import DecoderLM

# family -> "module:Class" (imported on first use)
FAMILY_CLASSES: dict[str, str] = {
    "decoder": "attnlab.models.decoder:DecoderLM",
    "encoder": "attnlab.models.encoder:EncoderModel",
    "seq2seq": "attnlab.models.seq2seq:Seq2SeqLM",
    "rwkv": "attnlab.models.rwkv.v4:RWKVLM",
}
# (family, version) -> "module:Class" for a family whose versions are different classes
VERSION_CLASSES: dict[tuple[str, int], str] = {
    ("rwkv", 7): "attnlab.models.rwkv.v7:RWKV7LM",
}


def model_class(family: str, version: int | None = None) -> type[AttnlabModel]:
    if family not in FAMILY_CLASSES:
        raise ValueError(f"family={family!r} is not valid; choose one of: {sorted(FAMILY_CLASSES)}")
    module_name, cls_name = VERSION_CLASSES.get((family, version), FAMILY_CLASSES[family]).split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of the family ``cfg.family``."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"build_model expects an attnlab.ModelConfig, got {type(cfg).__name__}")
    cfg.validate()
    return model_class(cfg.family, cfg.rwkv_version if cfg.family == "rwkv" else None)(cfg)


__all__ = ["AttnlabModel", "DecoderLM", "FAMILY_CLASSES", "VERSION_CLASSES", "build_model", "model_class"]
