"""``generate()``: one loop for every family, through the cache protocol.

Prefill the prompt into a fresh cache, then feed one token per step. Batches of prompts of different
lengths are left-padded with an ``attention_mask`` (1 = real token, 0 = padding).
Shape legend: B batch, T prompt length, N new tokens, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attnlab.inference.fast import prepare_lazily
from attnlab.inference.inputs import as_batch, check_padding
from attnlab.inference.sampling import (
    apply_repetition_penalty,
    check_sampling_args,
    make_generator,
    sample_next,
)
from attnlab.layers.stack import check_token_ids

if TYPE_CHECKING:
    from attnlab.inference.drafters import Drafter
    from attnlab.models.base import AttnlabModel


@torch.inference_mode()
def generate(
    model: AttnlabModel,
    input_ids: Tensor | Sequence[Sequence[int]] | Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
    draft: AttnlabModel | Drafter | str | None = None,
    stream: Callable[[Tensor], None] | None = None,
    attention_mask: Tensor | None = None,
    repetition_penalty: float | None = None,
    gamma: int = 4,
    adaptive: bool = False,
    prepare: bool = True,
) -> Tensor:
    """Generate up to ``max_new_tokens`` after ``input_ids``; returns (B, T + new) token ids.

    For an encoder-decoder, ``input_ids`` is the source and the result is the decoder's sequence
    (start token + new tokens).

    ``temperature=0.0`` is greedy. ``stream(tokens)`` is called with the (B,) tokens of every step.
    ``draft`` (a model sharing the tokenizer, a Drafter, or ``"prompt_lookup"``) switches to speculative
    decoding with ``gamma`` drafted tokens per step (``adaptive=True`` tunes it on the fly).
    Rows that produced ``eos_token_id`` keep emitting it; generation stops once every row has.

    ``prepare`` (default True): an unprepared model is prepared lazily on its first call, without changing
    what it computes in training or what it saves (``inference/fast.prepare_lazily``: its fp32 linear
    layers take attnlab's few-row kernel, sharing their Parameters); ``prepare=False`` or
    ``ATTNLAB_PREPARE=0`` runs the model as it is. With a ``draft``, speculative decoding falls back to
    plain steps when the measured acceptance does not pay for the draft (``speculative_generate``'s
    ``fallback``, on here).
    """
    check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    device = model.device
    ids = as_batch(input_ids, device)
    check_token_ids(ids, model.config.vocab_size)
    attention_mask = check_padding(model, ids, attention_mask)
    if draft is not None:  # speculative decoding: same greedy output, same sampling distribution, faster
        if repetition_penalty not in (None, 1.0):
            raise ValueError("repetition_penalty is not supported with speculative decoding (draft=...)")
        from attnlab.inference.speculative import speculative_generate

        return speculative_generate(model, draft, ids, max_new_tokens, gamma=gamma, adaptive=adaptive,
                                    temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                    eos_token_id=eos_token_id, attention_mask=attention_mask, stream=stream,
                                    prepare=prepare, fallback=True)
    if prepare:
        prepare_lazily(model)
    B, T = ids.shape
    generator = make_generator(seed, device)
    was_training = model.training
    model.eval()
    try:
        # a decoder feeds its prompt; an encoder-decoder encodes it and starts from its start token
        cache, prompt, prompt_mask = model.begin_generation(ids, attention_mask, max_new_tokens)
        if max_new_tokens == 0:
            return prompt
        logits = model(prompt, cache=cache, attention_mask=prompt_mask)[:, -1]  # (B, V)
        out = [prompt]
        history = prompt
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            if repetition_penalty is not None and repetition_penalty != 1.0:
                logits = apply_repetition_penalty(logits.float(), history, repetition_penalty)
            token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done |= token == eos_token_id
            out.append(token[:, None])
            if repetition_penalty is not None:
                history = torch.cat([history, token[:, None]], dim=1)
            if stream is not None:
                stream(token)
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                break
            logits = model(token[:, None], cache=cache)[:, -1]
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)
