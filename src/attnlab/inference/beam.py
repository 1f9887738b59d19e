"""Beam search with a length penalty, for every family that generates (decoder, seq2seq).

Each of the B inputs keeps ``num_beams`` partial hypotheses ranked by their summed log-probabilities.
At every step each beam proposes its continuations; of the 2 x num_beams best, those ending in EOS
(among the top num_beams ranks) become finished hypotheses, scored

    score = sum(log p) / (generated_length ** length_penalty)

(Wu et al. 2016 use a smoothed variant; this is the form Hugging Face and fairseq use), and the best
num_beams that do not end become the next beams. The cache follows the beams with ``cache.reorder``.
A row stops once it has num_beams finished hypotheses; at the end, unfinished beams compete too.
With ``num_beams=1`` this is exactly greedy decoding.

Shape legend: B batch, K beams, V vocab, T tokens so far.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.inference.inputs import as_batch


def _score(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / (max(length, 1) ** length_penalty)


@torch.inference_mode()
def beam_search(
    model,
    input_ids,
    max_new_tokens: int,
    *,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    attention_mask: Tensor | None = None,
    return_scores: bool = False,
):
    """Best hypothesis per input: (B, prompt + new) ids (padded with ``pad_token_id`` or EOS or 0)."""
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams={num_beams!r} must be an integer >= 1")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    device = model.device
    ids = as_batch(input_ids, device)
    B, K = ids.shape[0], num_beams
    was_training = model.training
    model.eval()
    try:
        rep = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,) row of each beam
        mask = None if attention_mask is None else torch.as_tensor(attention_mask, device=device)[rep]
        cache, prompt, prompt_mask = model.begin_generation(ids[rep], mask, max_new_tokens)
        logits = model(prompt, cache=cache, attention_mask=prompt_mask)[:, -1]  # (B*K, V)
        V = logits.shape[-1]
        beam_scores = torch.full((B, K), float("-inf"), dtype=torch.float64, device=device)
        beam_scores[:, 0] = 0.0  # all beams start identical: let only the first one expand at step 0
        tokens = torch.empty(B * K, 0, dtype=torch.long, device=device)
        finished: list[list[tuple[float, float, list[int]]]] = [[] for _ in range(B)]  # (score, logprob, toks)
        done = [False] * B
        for step in range(max_new_tokens):
            logp = torch.log_softmax(logits.double(), dim=-1)  # scores accumulate in float64
            logp = logp.view(B, K, V) + beam_scores[..., None]
            top, idx = logp.view(B, K * V).topk(min(2 * K, K * V), dim=-1)  # (B, 2K)
            next_beam = torch.zeros(B, K, dtype=torch.long, device=device)
            next_tok = torch.zeros(B, K, dtype=torch.long, device=device)
            next_score = torch.full((B, K), float("-inf"), dtype=torch.float64, device=device)
            for b in range(B):
                if done[b]:
                    continue
                kept = 0
                for rank, (s, flat) in enumerate(zip(top[b].tolist(), idx[b].tolist())):
                    beam, tok = divmod(flat, V)
                    if s == float("-inf"):
                        break
                    if eos_token_id is not None and tok == eos_token_id:
                        if rank < K:
                            seq = tokens[b * K + beam].tolist() + [tok]
                            finished[b].append((_score(s, len(seq), length_penalty), s, seq))
                        continue
                    next_beam[b, kept], next_tok[b, kept], next_score[b, kept] = beam, tok, s
                    kept += 1
                    if kept == K:
                        break
                if len(finished[b]) >= K:
                    done[b] = True
            if all(done) or step == max_new_tokens - 1:
                break
            order = (torch.arange(B, device=device)[:, None] * K + next_beam).view(-1)  # (B*K,)
            cache.reorder(order)
            tokens = torch.cat([tokens[order], next_tok.view(-1, 1)], dim=1)
            beam_scores = next_score
            logits = model(next_tok.view(-1, 1), cache=cache)[:, -1]
        # out of steps: the last step's surviving continuations compete with the finished hypotheses
        if not all(done):
            for b in range(B):
                if done[b]:
                    continue
                for k in range(K):
                    s = float(next_score[b, k])
                    if s == float("-inf"):
                        continue
                    seq = tokens[b * K + int(next_beam[b, k])].tolist() + [int(next_tok[b, k])]
                    finished[b].append((_score(s, len(seq), length_penalty), s, seq))
        best = [max(f, key=lambda h: h[0]) for f in finished]
        fill = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
        width = max(len(h[2]) for h in best)
        new = torch.full((B, width), fill, dtype=torch.long, device=device)
        for b, h in enumerate(best):
            new[b, :len(h[2])] = torch.tensor(h[2], dtype=torch.long, device=device)
        out = torch.cat([prompt.view(B, K, -1)[:, 0], new], dim=1)
        if return_scores:
            return out, torch.tensor([h[0] for h in best], dtype=torch.float64)
        return out
    finally:
        model.train(was_training)
