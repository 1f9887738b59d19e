"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a drafter proposes γ tokens, the target
scores all of them in one forward pass over its cache, and the longest acceptable prefix is kept.

Acceptance rule, for proposal d_i drawn from the draft's q_i, with the target's p_i (both after the same
temperature / top-k / top-p):
  - greedy: accept while d_i == argmax p_i; the target's argmax at the first mismatch is the next token.
  - sampling: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample the
    next token from norm(max(0, p_i - q_i)); if all γ are accepted, sample a bonus token from p_{γ+1}.
    The output is then distributed exactly as sampling from the target alone.
Rejected tokens are rolled back in both caches with ``crop`` (in a batch, rows that accepted fewer
tokens than the longest get cache holes, so each row stays exact). A row that ends in a round keeps none
of its proposals in the caches: its accepted tokens may run past ``max_new_tokens`` (the output cuts them),
and kept slots would let the cache outgrow the capacity of T + N + γ + 1 slots while other rows go on.

Fallback to plain steps (``fallback=True``, what ``attnlab.generate(..., draft=...)`` uses): speculation
pays only while a round's expected tokens outweigh its cost. A round of γ proposals costs one target call
(the verification, priced as a plain step: optimistic for speculation) plus γ draft steps, c target calls'
worth each, and commits (1 - α^(γ+1)) / (1 - α) tokens on average; plain decoding commits one token per
target call. After ``PROBE_ROUNDS`` rounds, and after every round from then on, with α measured over every
examined position so far and c the median over the rounds of (draft seconds per drafted token) / (target
seconds of the verification) — a median, so that a round that compiled a graph or loaded a kernel does not
decide — speculation stops for the rest of the call when the best γ the call may use (``gamma``, or any of
1..gamma when adaptive) gives (1 - α^(γ+1)) / ((1 - α)(1 + c·γ)) < 1; the remaining tokens are plain
target steps (a round of γ = 0 through the same verification, so greedy tokens and the sampling law are
unchanged). A draft that never agrees (α = 0) always falls back: one token per round at a cost above a
target call's. The draft is not probed again in that call.

Adaptive γ: after each call, with α the running (exponential average) per-position acceptance rate
and c the measured cost of one draft step relative to one target call, the next γ maximises the expected
tokens per unit of time, (1 - α^(γ+1)) / ((1 - α)(1 + c·γ)), over 1..gamma_max.

Shape legend: B batch, G γ, V vocab, T prompt length, N new tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnlab.inference.drafters import (
    Drafter,
    HybridDrafter,
    ModelDrafter,
    PromptLookupDrafter,
    Sampling,
    draft_model,
)
from attnlab.inference.fast import prepare_lazily
from attnlab.inference.inputs import as_batch, check_context
from attnlab.inference.sampling import check_sampling_args, logits_to_probs, make_generator, sample_next
from attnlab.models.base import AttnlabModel


@dataclass
class SpecStats:
    target_calls: int = 0
    proposed: int = 0  # draft tokens proposed (summed over rows)
    accepted: int = 0  # of which accepted
    rejected: int = 0  # proposal rounds (per row) that ended at a rejected token
    generated: int = 0  # tokens committed by verification rounds (summed over rows; not the prompt's first)
    target_time: float = 0.0
    draft_time: float = 0.0
    gammas: list[int] = field(default_factory=list)
    plain_steps: int = 0  # target calls after falling back to plain decoding (``fallback``)
    fell_back_after: int | None = None  # the speculative rounds before the fallback (None: never fell back)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def alpha(self) -> float:
        """Per-position acceptance probability, the α of (1 - α^(γ+1)) / (1 - α).

        Proposals after a rejection are never examined, so accepted / proposed underestimates α; each
        examined position is either accepted or is the one rejection of its round.
        """
        seen = self.accepted + self.rejected
        return self.accepted / seen if seen else 0.0

    @property
    def tokens_per_call(self) -> float:
        """Mean tokens committed per row per target forward pass."""
        rows_calls = self.target_calls * max(1, self._rows)
        return self.generated / rows_calls if rows_calls else 0.0

    _rows: int = 1

    def as_dict(self) -> dict:
        return {"target_calls": self.target_calls, "proposed": self.proposed, "accepted": self.accepted,
                "generated": self.generated, "acceptance_rate": self.acceptance_rate,
                "rejected": self.rejected, "alpha": self.alpha,
                "tokens_per_call": self.tokens_per_call, "target_time": self.target_time,
                "draft_time": self.draft_time, "mean_gamma": sum(self.gammas) / max(1, len(self.gammas)),
                "plain_steps": self.plain_steps, "fell_back_after": self.fell_back_after}


def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """(1 - α^(γ+1)) / (1 - α): tokens per target call when each proposal is accepted with probability α."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def choose_gamma(alpha: float, cost_ratio: float, gamma_max: int) -> int:
    """The γ in 1..gamma_max maximising expected tokens per unit of time (see the module docstring)."""
    alpha = min(max(alpha, 0.01), 0.99)
    return max(range(1, gamma_max + 1),
               key=lambda g: expected_tokens_per_call(alpha, g) / (1 + cost_ratio * g))


PROBE_ROUNDS = 4  # speculative rounds measured before the fallback rule may stop speculation


def speculation_pays(alpha: float, cost_ratio: float, gammas: range) -> bool:
    """Whether some γ in ``gammas`` gives more tokens per unit of time than plain decoding:
    max over γ of (1 - α^(γ+1)) / ((1 - α)(1 + c·γ)) >= 1 (see the module docstring)."""
    return max(expected_tokens_per_call(alpha, g) / (1 + cost_ratio * g) for g in gammas) >= 1.0


def as_drafter(draft: AttnlabModel | Drafter | str, target: AttnlabModel) -> Drafter:
    """The ``Drafter`` behind a ``draft`` argument: a model sharing the target's tokenizer (drafting with
    its own cache), a ``Drafter`` as it is, or ``"prompt_lookup"``."""
    if isinstance(draft, str):
        if draft in ("prompt_lookup", "prompt-lookup"):
            return PromptLookupDrafter()
        raise ValueError(f"draft={draft!r}: give a model, a Drafter, or 'prompt_lookup'")
    if isinstance(draft, Drafter):
        if (model := draft_model(draft)) is not None:
            _check_draft_model(model, target)
        return draft
    if isinstance(draft, AttnlabModel):
        _check_draft_model(draft, target)
        return ModelDrafter(draft)
    raise ValueError(f"cannot use {type(draft).__name__} as a draft: give a model, a Drafter or 'prompt_lookup'")


def _check_draft_model(draft, target) -> None:
    """A draft model must share the target's tokenizer and be a decoder-like LM."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"the draft's vocabulary ({draft.config.vocab_size} tokens) differs from the target's "
            f"({target.config.vocab_size}): a draft must share the target's tokenizer"
        )
    for name in ("eos_token_id", "bos_token_id"):
        a, b = getattr(draft.config, name), getattr(target.config, name)
        if a is not None and b is not None and a != b:
            raise ValueError(f"draft and target disagree on {name} ({a} vs {b}): they use different tokenizers")
    if draft.config.family in ("encoder", "seq2seq"):
        raise ValueError("an encoder or encoder-decoder cannot draft for a decoder")


def _verify(logits: Tensor, drafts: Tensor, q: Tensor | None, sampling: Sampling,
            generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Target logits (B, G+1, V) vs proposals (B, G) -> (accepted count (B,), next token (B,))."""
    B, G = drafts.shape
    if sampling.greedy:
        best = logits.argmax(dim=-1)  # (B, G+1)
        accepted = (drafts == best[:, :G]).long().cumprod(dim=1).sum(dim=1)  # (B,)
        return accepted, best.gather(1, accepted[:, None]).squeeze(1)
    p = logits_to_probs(logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    if q is None:  # deterministic proposals: q is one-hot on each proposal
        q = torch.zeros_like(p[:, :G]).scatter_(-1, drafts[..., None], 1.0)
    p_d = p[:, :G].gather(-1, drafts[..., None]).squeeze(-1)  # (B, G)
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(B, G, generator=generator, device=logits.device)
    ok = u < torch.clamp(p_d / q_d.clamp_min(1e-30), max=1.0)  # accept with prob min(1, p/q)
    accepted = ok.long().cumprod(dim=1).sum(dim=1)  # (B,)
    rows = torch.arange(B, device=logits.device)
    p_next = p[rows, accepted]  # (B, V): p at the first rejection, or p_{G+1} for the bonus token
    q_pad = torch.cat([q, q.new_zeros(B, 1, q.shape[-1])], dim=1)  # q_{G+1} = 0: the bonus samples from p itself
    residual = torch.clamp(p_next - q_pad[rows, accepted], min=0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_next)
    return accepted, torch.multinomial(residual, 1, generator=generator).squeeze(1)


def _stream(stream, tokens: Tensor, length: Tensor, done: Tensor, streamed: int, max_new_tokens: int) -> int:
    """Hand ``stream`` every step all rows have reached since the last call; returns the steps streamed.
    ``tokens`` (B, W) holds each row's committed tokens, then the fill (EOS after an ended row)."""
    if stream is None:
        return streamed
    ready = int(torch.where(done, max_new_tokens, length.clamp(max=max_new_tokens)).min())
    for i in range(streamed, ready):
        stream(tokens[:, i].clone())
    return max(streamed, ready)


@torch.inference_mode()
def speculative_generate(
    target,
    draft,
    input_ids,
    max_new_tokens: int,
    *,
    gamma: int = 4,
    adaptive: bool = False,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
    attention_mask: Tensor | None = None,
    stream: Callable[[Tensor], None] | None = None,
    return_stats: bool = False,
    prepare: bool = True,
    fallback: bool = False,
):
    """Generate like ``attnlab.generate`` (same output for greedy, same distribution for sampling), faster.

    ``draft``: a model sharing the target's tokenizer, a Drafter, or ``"prompt_lookup"``. ``gamma`` is the
    draft length (the maximum when ``adaptive``). Returns (B, T + new) ids, and ``SpecStats`` if asked.
    ``prepare``: prepare the target and a draft model lazily, as ``generate`` does. ``fallback``: switch to
    plain steps when the measured acceptance does not pay for the draft (the rule in the module docstring).
    """
    if not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma={gamma!r} must be an integer >= 1 (the number of drafted tokens per step)")
    check_sampling_args(temperature, top_k, top_p)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    drafter = as_drafter(draft, target)
    if prepare:
        prepare_lazily(target)
        if draft_model(drafter) is not None:
            prepare_lazily(draft_model(drafter))
    device = target.device
    ids = as_batch(input_ids, device)
    B, T = ids.shape
    check_context(target, T, max_new_tokens)
    if isinstance(drafter, ModelDrafter | HybridDrafter) and T + max_new_tokens > drafter.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens ({T + max_new_tokens}) is longer than the draft model's "
                         f"context ({drafter.max_seq_len}); use a draft with a longer context or fewer tokens")
    mask = None if attention_mask is None else torch.as_tensor(attention_mask, device=device).long()
    stats = SpecStats(_rows=B)
    if max_new_tokens == 0:
        return (ids, stats) if return_stats else ids
    sampling = Sampling(temperature, top_k, top_p)
    generator = make_generator(seed, device)
    ctx = target.config.max_seq_len
    capacity = min(T + max_new_tokens + gamma + 1, ctx)
    drafting = target if draft_model(drafter) is None else draft_model(drafter)  # its mode is set and restored too
    was = (target.training, drafting.training)
    target.eval()
    drafting.eval()
    try:
        cache = target.new_cache(B, capacity)
        # the whole prompt in one call, as plain decoding feeds it, and its first token from those logits:
        # a prompt fed as T - 1 tokens leaves K/V that differ in the last bits from T tokens' (the products
        # sum over another number of rows), and in bf16 that is enough to part from plain decoding at a tie
        t0 = time.perf_counter()
        first = sample_next(target(ids, cache=cache, attention_mask=mask)[:, -1], temperature=temperature,
                            top_k=top_k, top_p=top_p, generator=generator)  # (B,)
        stats.target_time += time.perf_counter() - t0
        last = first  # committed, not yet fed to the target
        fill = eos_token_id if eos_token_id is not None else 0
        # each row's committed tokens (a round commits at most γ + 1, from a length below max_new_tokens)
        tokens = torch.full((B, max_new_tokens + gamma + 1), fill, dtype=torch.long, device=device)  # (B, W)
        tokens[:, 0] = first
        length = torch.ones(B, dtype=torch.long, device=device)  # (B,) tokens committed per row
        # (B,) rows that produced EOS
        done = first == eos_token_id if eos_token_id is not None else torch.zeros(B, dtype=torch.bool, device=device)
        t0 = time.perf_counter()
        drafter.start(torch.cat([ids, first[:, None]], dim=1),
                      None if mask is None else torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1), capacity)
        stats.draft_time += time.perf_counter() - t0
        g, alpha, cost = gamma, 0.7, 0.1
        streamed = _stream(stream, tokens, length, done, 0, max_new_tokens)
        seen_acc, seen_all = 0.7, 1.0  # running sums behind alpha (prior: 0.7)
        rows = torch.arange(B, device=device)
        plain = False  # fallen back to plain steps
        cost_samples: list[float] = []  # per round: draft seconds per drafted token / verification seconds
        while True:
            active = ~done & (length < max_new_tokens)  # (B,)
            n_active = int(active.sum())
            if not n_active:
                break
            longest, shortest = int(length[active].max()), int(length[active].min())
            room = ctx - T - longest  # the drafts' positions must stay inside the context
            g_round = 0 if plain else max(1, min(g, room, max_new_tokens - shortest))
            row_mask = None if n_active == B else active.long()  # finished rows are fed as holes
            t0 = time.perf_counter()
            if plain:  # one target step: a round without proposals
                drafts, q = torch.empty(B, 0, dtype=torch.long, device=device), None
            else:
                drafts, q = drafter.propose(g_round, sampling, generator, row_mask)  # (B, G), (B, G, V) | None
            t1 = time.perf_counter()
            if cache.max_len - cache.length < g_round + 1:
                cache.compact()
            feed_mask = None if row_mask is None else row_mask[:, None].expand(B, g_round + 1)
            logits = target(torch.cat([last[:, None], drafts], dim=1), cache=cache, attention_mask=feed_mask)
            accepted, new = _verify(logits, drafts, q, sampling, generator)  # (B,), (B,)
            accepted = torch.where(active, accepted, torch.zeros_like(accepted))
            t_rows = time.perf_counter()
            # each active row commits its accepted proposals, then the new token, cut after an EOS
            step = torch.arange(g_round + 1, device=device)[None, :]  # (1, G+1)
            row = torch.cat([drafts, new[:, None]], dim=1).scatter(1, accepted[:, None], new[:, None])  # (B, G+1)
            count = accepted + 1
            if eos_token_id is not None:
                is_eos = (row == eos_token_id) & (step < count[:, None])
                ended = is_eos.any(dim=1) & active
                count = torch.where(ended, is_eos.long().argmax(dim=1) + 1, count)  # up to the first EOS
                done |= ended
            count = torch.where(active, count, torch.zeros_like(count))
            write = step < count[:, None]  # (B, G+1)
            tokens[rows[:, None].expand_as(row)[write], (length[:, None] + step)[write]] = row[write]
            length += count
            stats.proposed += g_round * n_active
            stats.accepted += int(accepted.sum())
            stats.rejected += int((active & (accepted < g_round)).sum())
            stats.generated += int(count.sum())
            # the caches keep a row's accepted proposals only while the row goes on: a row that ends in this
            # round (EOS, or past max_new_tokens) would otherwise hold up to γ slots beyond its last needed
            # token, and with its neighbours still drafting the cache would outgrow its capacity
            going_on = ~done & (length < max_new_tokens)
            kept = torch.where(going_on, accepted, torch.zeros_like(accepted))  # (B,)
            t_rows = time.perf_counter() - t_rows  # bookkeeping: neither model's time
            keep_n = int(kept.max())
            cache.crop(cache.length - g_round + keep_n)  # drop proposals no row keeps
            if keep_n:
                cache.drop_slots(torch.arange(keep_n, device=device)[None, :] < kept[:, None])
            t2 = time.perf_counter()
            if not plain:
                drafter.commit(kept, new)
            t3 = time.perf_counter()
            stats.draft_time += (t1 - t0) + (t3 - t2)
            stats.target_time += t2 - t1 - t_rows
            stats.target_calls += 1
            last = torch.where(active, new, last)
            streamed = _stream(stream, tokens, length, done, streamed, max_new_tokens)
            if plain:
                stats.plain_steps += 1
                continue
            stats.gammas.append(g_round)
            if fallback:
                cost_samples.append(((t1 - t0) + (t3 - t2)) / g_round / max(t2 - t1 - t_rows, 1e-9))
                if len(cost_samples) >= PROBE_ROUNDS:
                    cost_ratio = sorted(cost_samples)[len(cost_samples) // 2]  # the median (upper, for even n)
                    if not speculation_pays(stats.alpha, cost_ratio, range(1, gamma + 1) if adaptive
                                            else range(gamma, gamma + 1)):
                        plain, stats.fell_back_after = True, len(stats.gammas)
            if adaptive:
                n_acc = float(accepted[active].sum())
                n_rej = float((accepted[active] < g_round).sum())
                seen_acc, seen_all = 0.8 * seen_acc + 0.2 * n_acc, 0.8 * seen_all + 0.2 * (n_acc + n_rej)
                alpha = seen_acc / max(seen_all, 1e-9)
                step_cost = (t1 - t0) / g_round / max(t2 - t1, 1e-9)
                cost = 0.8 * cost + 0.2 * step_cost
                g = choose_gamma(alpha, cost, gamma)
        # as plain generation: rows that ended pad with EOS; stop at the longest row when all ended
        width = max_new_tokens if not bool(done.all()) else min(max_new_tokens, int(length.max()))
        new_tokens = tokens[:, :width]
        out = torch.cat([ids, new_tokens], dim=1)
        return (out, stats) if return_stats else out
    finally:
        target.train(was[0])
        drafting.train(was[1])
