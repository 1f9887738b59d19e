"""Drafters for speculative decoding: who proposes the next γ tokens.

Every drafter has the same three calls (the ``Drafter`` protocol), so new ones plug in:

    start(prompt, attention_mask, capacity)    once, with the (left-padded) prompt
    propose(gamma, sampling, generator, rows)  -> tokens (B, γ), probs (B, γ, V) or None; ``rows`` (B,)
                                               long mask of rows still generating (None = all)
    commit(accepted, new_tokens)               how many of the proposals each row kept, and the token
                                               the target added after them

``probs`` is the distribution each proposal was drawn from (needed by the exact sampling rule); ``None``
means the proposals are deterministic (greedy draft, prompt lookup): q is one-hot on the proposal.

Shape legend: B batch, G γ (draft length), V vocab, T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from attnlab.inference.cache import SlotCache
from attnlab.inference.sampling import logits_to_probs


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@runtime_checkable
class Drafter(Protocol):
    """Who proposes the next γ tokens (the three calls of the module docstring). ``speculative_generate``
    takes any object with these methods as its ``draft``."""

    def start(self, prompt: Tensor, attention_mask: Tensor | None, capacity: int) -> None: ...

    def propose(self, gamma: int, sampling: Sampling, generator: torch.Generator | None,
                rows: Tensor | None = None) -> tuple[Tensor, Tensor | None]: ...

    def commit(self, accepted: Tensor, new_tokens: Tensor) -> None: ...


def draft_model(drafter: Drafter) -> nn.Module | None:
    """The model a built-in drafter runs (prepared for decoding and put in eval mode alongside the target),
    or None for prompt lookup and for a drafter of the caller's own, which manages its own model."""
    return drafter.model if isinstance(drafter, ModelDrafter | HybridDrafter) else None


class ModelDrafter:
    """A (small) model drafts autoregressively with its own cache; rejected tokens are rolled back with
    ``crop`` (and, in a batch whose rows accept different counts, turned into cache holes)."""

    def __init__(self, model) -> None:
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.max_seq_len = model.config.max_seq_len

    def start(self, prompt: Tensor, attention_mask: Tensor | None, capacity: int) -> None:
        B, T = prompt.shape
        if T + 1 > self.max_seq_len:
            raise ValueError(f"the prompt ({T} tokens) does not fit the draft model's context ({self.max_seq_len})")
        self.cache = self.model.new_cache(B, min(capacity, self.max_seq_len))
        if T > 1:
            self.model(prompt[:, :-1], cache=self.cache,
                       attention_mask=None if attention_mask is None else attention_mask[:, :-1])
        self.pending, self.pending_mask = prompt[:, -1:], None  # committed but not yet fed to the draft
        self.proposals: Tensor | None = None

    def _room(self, needed: int) -> None:
        if self.cache.max_len - self.cache.length < needed:
            if not isinstance(self.cache, SlotCache):
                raise ValueError("the draft's cache cannot make room (no compact()); use batch size 1")
            self.cache.compact()

    def propose(self, gamma: int, sampling: Sampling, generator: torch.Generator | None,
                rows: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        self._room(self.pending.shape[1] + gamma)
        mask = self.pending_mask
        if rows is not None:  # finished rows are fed as holes: their positions stop advancing
            mask = rows[:, None] * (torch.ones_like(self.pending) if mask is None else mask)
        logits = self.model(self.pending, cache=self.cache, attention_mask=mask)[:, -1]  # (B, V)
        step_mask = None if rows is None else rows[:, None]
        tokens, probs = [], []
        for i in range(gamma):
            if sampling.greedy:
                tok = logits.argmax(dim=-1)
            else:
                p = logits_to_probs(logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
                tok = torch.multinomial(p, 1, generator=generator).squeeze(-1)
                probs.append(p)
            tokens.append(tok)
            if i < gamma - 1:
                logits = self.model(tok[:, None], cache=self.cache, attention_mask=step_mask)[:, -1]
        self.proposals = torch.stack(tokens, dim=1)  # (B, G)
        return self.proposals, (torch.stack(probs, dim=1) if probs else None)

    def catch_up(self, proposals: Tensor, accepted: Tensor, new_tokens: Tensor) -> None:
        """Tokens committed in a round this drafter did not propose (a hybrid's lookup round): each row's
        ``proposals[:accepted]`` and its new token join the tokens still to be fed, one forward later.
        Rows that committed fewer tokens than the longest get holes, so every row's positions stay right."""
        G = proposals.shape[1]
        n = accepted + 1  # (B,)
        width = int(n.max())
        toks = torch.cat([proposals, new_tokens[:, None]], dim=1)  # (B, G+1)
        rows = torch.arange(width, device=toks.device)[None, :]  # (1, W)
        idx = torch.where(rows < accepted[:, None], rows, torch.full_like(rows, G))  # (B, W): then the new token
        committed = toks.gather(1, idx)  # (B, W)
        real = (rows < n[:, None]).long()
        old_mask = torch.ones_like(self.pending) if self.pending_mask is None else self.pending_mask
        self.pending = torch.cat([self.pending, committed], dim=1)
        mask = torch.cat([old_mask, real], dim=1)
        self.pending_mask = None if bool(mask.all()) else mask

    def commit(self, accepted: Tensor, new_tokens: Tensor) -> None:
        G = self.proposals.shape[1]
        fed = G - 1  # d_1 .. d_{G-1} went through the draft; d_G did not
        kept = accepted.clamp(max=fed)  # (B,)
        k_max = int(kept.max())
        self.cache.crop(self.cache.length - fed + k_max)
        if k_max:
            keep = torch.arange(k_max, device=kept.device)[None, :] < kept[:, None]  # (B, k_max)
            self.cache.drop_slots(keep)
        all_in = accepted == G  # rows that kept d_G must feed it before the new token
        if bool(all_in.any()):
            self.pending = torch.stack([self.proposals[:, -1], new_tokens], dim=1)  # (B, 2)
            self.pending_mask = None if bool(all_in.all()) else torch.stack([all_in, torch.ones_like(all_in)], 1).long()
        else:
            self.pending, self.pending_mask = new_tokens[:, None], None


class PromptLookupDrafter:
    """Prompt lookup (n-gram) drafting: no draft model at all.

    Find the most recent earlier occurrence of the last n tokens (n from ``max_ngram`` down to
    ``min_ngram``) in the prompt and the text generated so far, and propose the tokens that followed it.
    Input-grounded tasks (editing, summarising, code rewriting) repeat long spans, so the target often
    accepts several tokens per call. Proposals are deterministic (q is one-hot).
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.vocab_size = None  # any vocabulary

    def start(self, prompt: Tensor, attention_mask: Tensor | None, capacity: int) -> None:
        rows = prompt.tolist()
        if attention_mask is not None:
            rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(rows, attention_mask.tolist())]
        self.history = rows
        self.device = prompt.device

    def follow(self, seq: list[int], gamma: int) -> list[int]:
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            tail = seq[-n:]
            for start in range(len(seq) - n - 1, -1, -1):  # most recent match first
                if seq[start:start + n] == tail:
                    follow = seq[start + n:start + n + gamma]
                    if follow:
                        return follow
        return []

    @staticmethod
    def padded(follow: list[int], seq: list[int], gamma: int) -> list[int]:
        """``gamma`` proposals: the lookup's, then repeats of the last one (or of the last token when there is
        no match: cheap to verify, usually rejected)."""
        return follow + [follow[-1] if follow else seq[-1]] * (gamma - len(follow))

    def propose(self, gamma: int, sampling: Sampling, generator: torch.Generator | None,
                rows: Tensor | None = None) -> tuple[Tensor, None]:
        out = [self.padded(self.follow(seq, gamma), seq, gamma) for seq in self.history]
        self.proposals = torch.tensor(out, dtype=torch.long, device=self.device)
        return self.proposals, None

    def commit(self, accepted: Tensor, new_tokens: Tensor) -> None:
        for b, seq in enumerate(self.history):
            n = int(accepted[b])
            seq.extend(self.proposals[b, :n].tolist())
            seq.append(int(new_tokens[b]))


class HybridDrafter:
    """Prompt lookup where the text offers a match, the draft model everywhere else.

    Each round, if every generating row's last ``min_match``..``max_ngram`` tokens occur earlier in its
    prompt or output, the tokens that followed are proposed at no model cost; otherwise the draft model
    drafts. Tokens committed in lookup rounds are fed to the draft model in one forward at its next round.
    Copy-heavy stretches (code that repeats identifiers and lines, edits of a given text) go through the
    free lookup, novel stretches through the model. Proposals of a lookup round are deterministic (q is
    one-hot), so the exact sampling rule holds for both sources. In a batch, a round is a lookup round
    only when every generating row has a match (the model drafts for all rows otherwise).
    """

    def __init__(self, model, max_ngram: int = 3, min_match: int = 2) -> None:
        self.model_drafter = ModelDrafter(model)
        self.lookup = PromptLookupDrafter(max_ngram=max_ngram, min_ngram=min_match)
        self.model = model
        self.vocab_size = self.model_drafter.vocab_size
        self.max_seq_len = self.model_drafter.max_seq_len
        self.lookup_rounds = self.model_rounds = 0

    def start(self, prompt: Tensor, attention_mask: Tensor | None, capacity: int) -> None:
        self.model_drafter.start(prompt, attention_mask, capacity)
        self.lookup.start(prompt, attention_mask, capacity)
        self.lookup_rounds = self.model_rounds = 0

    def propose(self, gamma: int, sampling: Sampling, generator: torch.Generator | None,
                rows: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        active = range(len(self.lookup.history)) if rows is None else [b for b, r in enumerate(rows.tolist()) if r]
        follows = {b: self.lookup.follow(self.lookup.history[b], gamma) for b in active}
        self.source = "lookup" if all(follows.values()) else "model"
        if self.source == "model":
            self.model_rounds += 1
            self.proposals, probs = self.model_drafter.propose(gamma, sampling, generator, rows)
            return self.proposals, probs
        self.lookup_rounds += 1
        out = [self.lookup.padded(follows.get(b, []), seq, gamma) for b, seq in enumerate(self.lookup.history)]
        self.proposals = torch.tensor(out, dtype=torch.long, device=self.lookup.device)
        return self.proposals, None

    def commit(self, accepted: Tensor, new_tokens: Tensor) -> None:
        if self.source == "model":
            self.model_drafter.commit(accepted, new_tokens)
        else:
            self.model_drafter.catch_up(self.proposals, accepted, new_tokens)
        self.lookup.proposals = self.proposals
        self.lookup.commit(accepted, new_tokens)
