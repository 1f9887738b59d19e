"""The checks every generation entry makes on its inputs: token ids as a (B, T) batch, the padding side the
model reads, and the context the prompt and the new tokens need. Shared by ``generate``, speculative decoding,
beam search and the models' ``begin_generation``.
Shape legend: B batch, T prompt length.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from attnlab.models.base import AttnlabModel


def as_batch(input_ids, device: torch.device) -> Tensor:
    """Accept a list, a 1-D or a 2-D tensor of token ids; return (B, T) long."""
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device) if not isinstance(input_ids, Tensor) else input_ids
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (B, T) batch of token ids, got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"input_ids must be integer token ids, got {ids.dtype}")
    return ids.to(device=device, dtype=torch.long)


def check_padding(model: AttnlabModel, ids: Tensor, attention_mask) -> Tensor | None:
    """The ``attention_mask`` as a tensor on the ids' device, after checking it pads the side the model reads.

    A decoder continues each row from its *last* position, so padding must come first (left padding:
    each row's mask is 0...0 1...1); right padding would continue from a pad token and return garbage.
    An encoder-decoder numbers source positions from the first column, so its sources are right-padded
    (1...1 0...0). The mask holds 0 and 1 only, and every row has at least one real token.
    """
    if attention_mask is None:
        return None
    mask = torch.as_tensor(attention_mask, device=ids.device)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    real = mask.to(torch.bool)
    if not bool(real.any(dim=1).all()):
        row = int((~real.any(dim=1)).nonzero()[0, 0])
        raise ValueError(f"attention_mask row {row} has no real token (all padding); drop that row")
    seq2seq = model.config.family == "seq2seq"
    # left padding: the mask never goes from 1 back to 0 along a row; right padding: never from 0 to 1
    wrong = (real[:, :-1] & ~real[:, 1:]) if not seq2seq else (~real[:, :-1] & real[:, 1:])
    if bool(wrong.any()):
        row = int(wrong.any(dim=1).nonzero()[0, 0])
        if seq2seq:
            raise ValueError(f"attention_mask row {row} has padding before real tokens: an encoder-decoder reads "
                             f"right-padded sources (real tokens first, padding at the end); right-pad the batch")
        raise ValueError(f"attention_mask row {row} has padding after real tokens: generate() continues every row "
                         f"from its last position, so pad on the left (padding first, then the prompt)")
    return mask


def check_context(model: AttnlabModel, prompt_len: int, max_new_tokens: int) -> None:
    if model.config.unbounded_context:
        return  # a stream: memory does not grow with the input
    ctx = model.config.max_seq_len
    if prompt_len > ctx:
        raise ValueError(
            f"the prompt has {prompt_len} tokens but the model's context is {ctx} (max_seq_len); "
            f"shorten the prompt to at most {ctx} tokens"
        )
    if prompt_len + max_new_tokens > ctx:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"of {ctx} tokens; ask for at most {ctx - prompt_len} new tokens"
        )


__all__ = ["as_batch", "check_context", "check_padding"]
