"""Model families. ``build_model(cfg)`` maps ``cfg.family`` (and, for RWKV, ``cfg.rwkv_version``) to its class."""

from __future__ import annotations

from torch import nn

from attnlab.config import ModelConfig
from attnlab.models.base import AttnlabModel
from attnlab.models.decoder import DecoderLM
from attnlab.models.encoder import EncoderModel
from attnlab.models.rwkv import RWKV7LM, RWKVLM
from attnlab.models.seq2seq import Seq2SeqLM

# family -> class
FAMILY_CLASSES: dict[str, type[AttnlabModel]] = {
    "decoder": DecoderLM,
    "encoder": EncoderModel,
    "seq2seq": Seq2SeqLM,
    "rwkv": RWKVLM,
}
# (family, version) -> class, for a family whose versions are different classes
VERSION_CLASSES: dict[tuple[str, int], type[AttnlabModel]] = {
    ("rwkv", 7): RWKV7LM,
}


def model_class(family: str, version: int | None = None) -> type[AttnlabModel]:
    if family not in FAMILY_CLASSES:
        raise ValueError(f"family={family!r} is not valid; choose one of: {sorted(FAMILY_CLASSES)}")
    return VERSION_CLASSES.get((family, version), FAMILY_CLASSES[family])


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of the family ``cfg.family``."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"build_model expects an attnlab.ModelConfig, got {type(cfg).__name__}")
    cfg.validate()
    return model_class(cfg.family, cfg.rwkv_version if cfg.family == "rwkv" else None)(cfg)


__all__ = ["AttnlabModel", "DecoderLM", "EncoderModel", "FAMILY_CLASSES", "RWKV7LM", "RWKVLM", "Seq2SeqLM",
           "VERSION_CLASSES", "build_model", "model_class"]
