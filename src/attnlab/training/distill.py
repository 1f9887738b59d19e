"""Knowledge distillation: train a small model (a speculative draft) to imitate a teacher's next-token
distribution rather than only the data's next token (Hinton et al. 2015; for drafts, the DistillSpec
recipe of Zhou et al. 2024: the draft's value is how often it agrees with the target).

Loss on each window, with teacher logits t and student logits s at temperature τ:

    w · τ² · KL(softmax(t / τ) || softmax(s / τ)) + (1 - w) · cross-entropy(s, next token)

The teacher runs without gradients in its own precision. Evaluation adds ``top1_agree``: how often the
student's argmax equals the teacher's, which is the per-position acceptance rate α of greedy speculative
decoding on this data.

Shape legend: B batch, T window length, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.training.losses import LMTask


class DistillTask(LMTask):
    def __init__(self, base: LMTask, teacher: torch.nn.Module, *, weight: float = 0.9, temperature: float = 1.0):
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"--distill-weight {weight} must be in [0, 1]")
        if temperature <= 0:
            raise ValueError(f"--distill-temperature {temperature} must be > 0")
        super().__init__(base.train, base.validation, bytes_per_token=base.bytes_per_token)
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight, self.temperature = weight, temperature

    def check_student(self, model: torch.nn.Module) -> None:
        s, t = model.config.vocab_size, self.teacher.config.vocab_size
        if s != t:
            raise ValueError(f"--distill: the teacher's vocabulary ({t}) differs from the student's ({s}); "
                             f"train the student with --tokenizer <teacher directory>")

    def loss(self, model, batch: Tensor, *, context_parallel=None) -> tuple[Tensor, int]:
        if context_parallel is not None:
            raise ValueError("--distill does not combine with --context-parallel")
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T), (B, T)
        with torch.no_grad():
            t_logits = self.teacher(x).float()  # (B, T, V)
        s_logits = model(x).float()  # (B, T, V)
        ce = F.cross_entropy(s_logits.flatten(0, 1), y.flatten())
        tau = self.temperature
        kl = F.kl_div(F.log_softmax(s_logits / tau, -1).flatten(0, 1), F.log_softmax(t_logits / tau, -1).flatten(0, 1),
                      log_target=True, reduction="batchmean")
        return self.weight * tau * tau * kl + (1 - self.weight) * ce, y.numel()

    def metrics(self, mean_loss: float) -> dict[str, float]:
        return {"loss": mean_loss}  # the distillation objective; cross-entropy comes from evaluate_extra

    @torch.no_grad()
    def evaluate_extra(self, model) -> dict[str, float]:
        agree = total = 0
        ce_sum = 0.0
        for batch in self.eval_batches(8):
            x, y = batch[:, :-1], batch[:, 1:]
            s_logits = model(x).float()
            agree += int((s_logits.argmax(-1) == self.teacher(x).argmax(-1)).sum())
            total += y.numel()
            ce_sum += float(F.cross_entropy(s_logits.flatten(0, 1), y.flatten(), reduction="sum"))
        out = {"top1_agree": agree / max(total, 1), "ce": ce_sum / max(total, 1)}
        if self.bytes_per_token:
            out["bpb"] = out["ce"] / math.log(2) / self.bytes_per_token
        return out


@torch.no_grad()
def init_embeddings_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module) -> float:
    """Start a narrow student's token table from the teacher's, projected on its top principal directions.

    With E the teacher's (V, C_t) embedding and P its top ``C_s`` principal directions (SVD of the centred
    table), the student's (V, C_s) table is ``(E - mean) P`` rescaled to the student's init std: tokens the
    teacher places together start together, which is most of what a tied embedding/LM head must learn.
    An untied student of a tied teacher starts its head the same way (the rows of the tokens it scores).
    Returns the fraction of the table's variance the projection keeps.
    """
    e_t, e_s = teacher.embed.weight.detach().float(), student.embed.weight
    if e_t.shape[0] != e_s.shape[0]:
        raise ValueError(f"the teacher's vocabulary ({e_t.shape[0]}) differs from the student's ({e_s.shape[0]})")
    if e_s.shape[1] > e_t.shape[1]:
        raise ValueError("the student is wider than the teacher: nothing to project")
    centred = e_t - e_t.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)  # vh: (C_t, C_t), rows = directions
    k = e_s.shape[1]
    proj = centred @ vh[:k].T  # (V, C_s)
    proj = proj * (student.config.init_std / proj.std())
    e_s.copy_(proj.to(e_s.dtype))
    head = student.lm_head.weight
    if head is not e_s and teacher.lm_head.weight is teacher.embed.weight:  # a tied teacher: its head is its table
        rows = student.head_token_ids if student.config.head_vocab_size else None
        head.copy_((proj if rows is None else proj[rows]).to(head.dtype))
    return float((s[:k] ** 2).sum() / (s ** 2).sum())


class TeacherDataTask:
    """Distillation from stored teacher labels (``attnlab data teacher``): no teacher runs while training.

    Each batch holds sequences the teacher wrote and its top-K log-probabilities at every position. The loss
    is the cross-entropy of the student's distribution against the teacher's, renormalised over those K
    tokens (sparse distillation; with τ the temperature, ``τ² · -Σ_k p_k log q_k``, p = softmax(top-K / τ)).
    A student whose head scores only N tokens (``head_vocab_size``) is scored over those: p is renormalised
    over the top-K tokens it has, and positions where it has none are left out.
    Evaluation adds ``top1_agree`` (student argmax == teacher argmax over all valid positions) and
    ``alpha_generated`` (the same over positions whose input the teacher wrote: greedy speculative
    decoding's per-position acceptance rate on the teacher's own text).
    """

    families = ("decoder", "rwkv")

    def __init__(self, train, validation, *, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"--distill-temperature {temperature} must be > 0")
        self.train, self.validation, self.temperature = train, validation, temperature
        self.bytes_per_token = None

    def check_student(self, model: torch.nn.Module) -> None:
        s, t = model.config.vocab_size, self.train.settings["vocab_size"]
        if s != t:
            raise ValueError(f"--teacher-data: the teacher's vocabulary ({t}) differs from the student's ({s}); "
                             f"train the student with --tokenizer {self.train.settings['teacher'] or '<teacher>'}")

    def train_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        return self.train.sample(batch_size, generator)

    def eval_batches(self, n: int) -> list[dict[str, Tensor]]:
        return self.validation.fixed(n)

    def loss(self, model, batch: dict[str, Tensor], *, context_parallel=None) -> tuple[Tensor, int]:
        if context_parallel is not None:
            raise ValueError("--teacher-data does not combine with --context-parallel")
        tau = self.temperature
        mask, ids, t_logp = batch["mask"], batch["topk_ids"], batch["topk_logp"]  # (B, L), (B, L, K), (B, L, K)
        head = model.head_token_ids if model.config.head_vocab_size else None
        if head is None:
            s_logits = model(batch["x"])  # (B, L, V)
        else:  # a head over N tokens: score in its own index space, the teacher's labels mapped into it
            s_logits = model(batch["x"], full_vocab=False)  # (B, L, N)
            index = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
            index[head] = torch.arange(head.numel())
            ids = index[ids]
            t_logp = t_logp.masked_fill(ids < 0, float("-inf"))  # renormalised over the tokens the head has
            mask = mask & (ids >= 0).any(-1)
            ids = ids.clamp_min(0)
        s_logp = F.log_softmax(s_logits.float() / tau, dim=-1)
        picked = s_logp.gather(-1, ids)  # (B, L, K)
        p = F.softmax(t_logp / tau, dim=-1).nan_to_num(0.0)  # (B, L, K); rows with no kept token: masked out
        per_pos = -(p * picked).sum(-1)  # (B, L)
        n = int(mask.sum())
        return tau * tau * per_pos[mask].sum() / max(n, 1), n

    def metrics(self, mean_loss: float) -> dict[str, float]:
        return {"loss": mean_loss}

    @torch.no_grad()
    def evaluate_extra(self, model) -> dict[str, float]:
        agree = total = agree_gen = total_gen = 0
        for batch in self.eval_batches(self.validation.n):
            hit = model(batch["x"]).argmax(-1) == batch["topk_ids"][..., 0]  # (B, L)
            agree += int(hit[batch["mask"]].sum())
            total += int(batch["mask"].sum())
            agree_gen += int(hit[batch["generated"]].sum())
            total_gen += int(batch["generated"].sum())
        return {"top1_agree": agree / max(total, 1), "alpha_generated": agree_gen / max(total_gen, 1)}
