"""``generate()``: one loop for every family, through the cache protocol.

Prefill the prompt into a fresh cache, then feed one token per step. Batches of prompts of different
lengths are left-padded with an ``attention_mask`` (1 = real token, 0 = padding).
Shape legend: B batch, T prompt length, N new tokens, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attnlab.inference.sampling import (
    apply_repetition_penalty,
    check_sampling_args,
    make_generator,
    sample_next,
)
from attnlab.layers.stack import check_token_ids


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


def check_padding(model, ids: Tensor, attention_mask) -> Tensor | None:
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
    seq2seq = getattr(model.config, "family", "decoder") == "seq2seq"
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


def check_context(model, prompt_len: int, max_new_tokens: int) -> None:
    if getattr(model.config, "attention_mechanism", "softmax") == "infini":
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


@torch.inference_mode()
def generate(
    model,
    input_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
    draft=None,
    stream: Callable[[Tensor], None] | None = None,
    attention_mask: Tensor | None = None,
    repetition_penalty: float | None = None,
    gamma: int = 4,
    adaptive: bool = False,
) -> Tensor:
    """Generate up to ``max_new_tokens`` after ``input_ids``; returns (B, T + new) token ids.

    For an encoder-decoder, ``input_ids`` is the source and the result is the decoder's sequence
    (start token + new tokens).

    ``temperature=0.0`` is greedy. ``stream(tokens)`` is called with the (B,) tokens of every step.
    ``draft`` (a model sharing the tokenizer, a Drafter, or ``"prompt_lookup"``) switches to speculative
    decoding with ``gamma`` drafted tokens per step (``adaptive=True`` tunes it on the fly).
    Rows that produced ``eos_token_id`` keep emitting it; generation stops once every row has.
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
                                    eos_token_id=eos_token_id, attention_mask=attention_mask, stream=stream)
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
