"""attnlab: every idea of the Transformer field guide as a switchable, tested and measured component."""

from attnlab.config import ModelConfig
from attnlab.hub import from_pretrained, load_tokenizer
from attnlab.inference.fast import prepare_for_decode
from attnlab.inference.generate import generate
from attnlab.inference.speculative import speculative_generate
from attnlab.models import build_model

__version__ = "0.1.0"

__all__ = ["ModelConfig", "build_model", "from_pretrained", "generate", "load_tokenizer", "prepare_for_decode",
           "speculative_generate", "__version__"]
