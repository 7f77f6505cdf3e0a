"""The loss of one micro-batch, computed a time-chunk at a time, and its backward pass.

Memory: the student's decoder runs once with grad, giving hidden states h_B_R_H. They are detached into a leaf;
each chunk of positions is projected to student and teacher logits (B x c x V), its loss is back-propagated into
the leaf at once and the chunk's logits are freed. Finally the accumulated leaf gradient is pushed through the
decoder in one backward. Peak logits memory is B x c x V per model, whatever the response length, with no recompute.

Normalisation: every chunk's loss is divided by ``n_total``, the number of selected tokens in the WHOLE batch
(all micro-batches), so the summed gradient is the token-level mean of the batch however it is split. With
position weights w (``loss.position_gamma``) the loss is sum(w * loss) / n_total with n_total = sum of w over the
batch's selected tokens, a weighted mean that is just as independent of the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from esr.config import LossConfig
from esr.losses import (
    DIVERGENCES,
    jsd,
    reverse_kl,
    sampled_advantage,
    sampled_pg_loss,
    token_logprobs,
    token_mean_over_batch,
)
from esr.models.forward import head_logits, response_hidden
from esr.teacher.score import TeacherScorer
from esr.teacher.vocab_map import VocabMap
from esr.train.memory import release_freed_memory
from esr.types import Rollouts


@dataclass
class MicroBatchResult:
    loss: float
    """This micro-batch's share of the batch loss (sums to the batch loss over micro-batches)."""
    kl_sum: float
    """Sum of exact reverse KL over selected tokens (the metric, whatever the training loss)."""
    kl_B_R: torch.Tensor
    """Per-position reverse KL, detached, on CPU; 0 where not selected."""


def per_token_loss(
    cfg: LossConfig, student_logits_B_T_V: torch.Tensor, teacher_logits_B_T_V: torch.Tensor, tokens_B_T: torch.Tensor
) -> torch.Tensor:
    """The training loss at each position, (B, T), for ``loss.kind``."""
    if cfg.kind == "sampled":
        student_logp_B_T = token_logprobs(student_logits_B_T_V, tokens_B_T)
        teacher_logp_B_T = token_logprobs(teacher_logits_B_T_V, tokens_B_T)
        return sampled_pg_loss(student_logp_B_T, sampled_advantage(teacher_logp_B_T, student_logp_B_T))
    if cfg.kind == "jsd":
        return jsd(student_logits_B_T_V, teacher_logits_B_T_V, cfg.beta)
    return DIVERGENCES[cfg.kind](student_logits_B_T_V, teacher_logits_B_T_V)


def loss_mask(select_B_R: torch.Tensor, weight_B_R: torch.Tensor | None) -> torch.Tensor:
    """The mask the loss is reduced with: ``select_B_R`` itself (bool), or the weights on selected tokens (float)."""
    if weight_B_R is None:
        return select_B_R
    weight_B_R = weight_B_R.to(select_B_R.device)
    return torch.where(select_B_R, weight_B_R, torch.zeros_like(weight_B_R))


def distill_micro_batch(
    student: nn.Module,
    scorer: TeacherScorer,
    rollouts: Rollouts,
    select_B_R: torch.Tensor,
    n_total: float,
    cfg: LossConfig,
    vocab_size: int,
    *,
    weight_B_R: torch.Tensor | None = None,
    teacher_hidden_B_R_H: torch.Tensor | None = None,
    vocab_map: VocabMap | None = None,
) -> MicroBatchResult:
    """Forward and backward of one micro-batch; gradients accumulate into the student's parameters.

        loss = sum_{selected (b,t)} w[b,t] * loss[b,t] / n_total      (w = 1 when ``weight_B_R`` is None)

    ``teacher_hidden_B_R_H``: the teacher's hidden states when the caller already has them (a selection scoring
    pass, or cross-tokenizer ``aligned-exact``, which gathers them at the student's positions and passes the
    ``vocab_map`` whose shared columns both distributions are restricted, and renormalised, to).
    """
    device = next(student.parameters()).device
    if teacher_hidden_B_R_H is None:
        teacher_hidden_B_R_H = scorer.score(rollouts)
        release_freed_memory(device)  # the teacher's activations (esr/train/memory.py)
    if vocab_map is not None:
        vocab_map = vocab_map.to(device)
    student_hidden_B_R_H = response_hidden(student, rollouts)
    release_freed_memory(device)  # the forward's temporaries; what backward needs stays
    leaf_B_R_H = student_hidden_B_R_H.detach().requires_grad_(True)
    tokens_B_R = rollouts.response_ids_B_R.to(device)
    select_B_R = select_B_R.to(device)
    loss_mask_B_R = loss_mask(select_B_R, weight_B_R)
    R = tokens_B_R.shape[1]
    loss_total, kl_sum = 0.0, 0.0
    kl_B_R = torch.zeros(tokens_B_R.shape, dtype=torch.float32)
    for a in range(0, R, cfg.chunk_size):
        b = min(R, a + cfg.chunk_size)
        student_logits = head_logits(student, leaf_B_R_H[:, a:b], vocab_size)
        teacher_logits = scorer.logits(teacher_hidden_B_R_H[:, a:b])
        if vocab_map is not None:  # log_softmax inside the divergences renormalises over the shared tokens
            student_logits, teacher_logits = vocab_map.restrict(student_logits, teacher_logits)
        values_B_T = per_token_loss(cfg, student_logits, teacher_logits, tokens_B_R[:, a:b])
        loss = token_mean_over_batch(values_B_T, loss_mask_B_R[:, a:b], n_total)
        if loss.requires_grad:
            loss.backward()
        with torch.no_grad():
            kl = values_B_T if cfg.kind == "reverse_kl" else reverse_kl(student_logits, teacher_logits)
            kl = torch.where(select_B_R[:, a:b], kl.detach(), torch.zeros_like(kl))
            kl_B_R[:, a:b] = kl.cpu()
            kl_sum += float(kl.sum())
        loss_total += float(loss.detach())
        del student_logits, teacher_logits, values_B_T, loss
    if leaf_B_R_H.grad is not None:
        student_hidden_B_R_H.backward(leaf_B_R_H.grad)
    return MicroBatchResult(loss=loss_total, kl_sum=kl_sum, kl_B_R=kl_B_R)
