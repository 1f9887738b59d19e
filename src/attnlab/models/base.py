"""What every attnlab model shares: its config, initialisation, parameter count and saving."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from attnlab.config import ModelConfig
from attnlab.inference.cache import Cache

if TYPE_CHECKING:
    from attnlab.inference.fast import CompiledForward
    from attnlab.inference.static import StaticDecoder


class AttnlabModel(nn.Module):
    config: ModelConfig
    # What decode-time transforms record on a model; a model none has touched keeps these defaults.
    prepared_for_decode: str | None = None  # the settings prepare_for_decode applied (inference/fast.py)
    lazily_prepared: bool = False  # generate()'s non-destructive fp32 preparation ran (inference/fast.py)
    stored_weights: str | None = None  # set when the weights are a GGUF's blocks as stored (interop/gguf_native.py)
    static_decoder: StaticDecoder | None = None  # the static-shape decode graphs in front of forward
    compiled_forward: CompiledForward | None = None  # the torch.compile'd forward of compile="dynamic"

    def init_weights(self) -> None:
        """Normal(0, init_std) for weights, zeros for biases; residual output projections scaled by
        1/sqrt(2 * n_layers) (GPT-2) so the residual stream's variance does not grow with depth."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1.0 / math.sqrt(2 * self.config.n_layers) if name.endswith(("o_proj", "down")) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        seen: set[int] = set()
        total = 0
        for name, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and "embed" in name):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def input_embeddings(self) -> nn.Module:
        """The token table every family has as ``embed`` (an ``nn.Embedding``, or a ``BlockEmbedding`` once
        ``prepare_for_decode`` stored it in blocks); a seq2seq model's encoder table (shared, by default)."""
        return self.embed

    def output_embeddings(self) -> nn.Module | None:
        """The LM head ``lm_head`` (V rows over d_model; tied models share it with a token table), or None for a
        family built without one (an encoder with ``mlm_head=False`` overrides this)."""
        return self.lm_head

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def begin_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         max_new_tokens: int) -> tuple[Cache, torch.Tensor, torch.Tensor | None]:
        """Start a generation: return (cache, prompt to feed first, its attention mask).

        A decoder feeds the prompt itself into a cache sized for prompt + new tokens; an encoder-decoder
        overrides this to encode the source and start the decoder from its start token.
        """
        from attnlab.inference.inputs import check_context

        B, T = input_ids.shape
        check_context(self, T, max_new_tokens)
        return self.new_cache(B, T + max_new_tokens), input_ids, attention_mask

    def save_pretrained(self, directory: str | Path, *, dtype: torch.dtype | None = None,
                        overwrite: bool = False) -> Path:
        """Write ``config.json`` + ``model.safetensors`` atomically as ``directory``.

        ``directory`` may be missing, empty or an earlier attnlab model; one holding other files is refused
        (``overwrite=True`` also replaces a training run's files, never foreign ones).
        """
        from attnlab.checkpoint import save_model

        return save_model(self, directory, dtype=dtype, overwrite=overwrite)
