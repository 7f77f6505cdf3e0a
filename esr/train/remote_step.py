"""The loss of one micro-batch when the teacher is a server (``teacher.url``): ``loss.kind=sampled`` from log p_t.

The server returns log p_t(y_t) of each sampled token for the whole batch, (B, R), once per step
(``RemoteScorer.teacher_logprobs``); each micro-batch takes its rows. The student side is ``esr.train.step``'s:
the decoder runs once with grad, its response hidden states are detached into a leaf, and chunks of ``loss.chunk_size``
positions are projected to logits (B x c x V), reduced to log p_s(y_t) and back-propagated at once; finally the leaf's
gradient goes through the decoder in one backward. Per selected token (b, t), with w the position weight:

    A[b,t]    = log p_t(y) - log p_s(y)                       (detached: ``sampled_advantage``)
    loss      = sum_{selected} w[b,t] * (-A[b,t] * log p_s(y)) / n_total      (``sampled_pg_loss``)

with the same ``n_total`` (the batch's selected tokens, or their summed weights) as the local path, so the value and
gradient equal ``distill_micro_batch`` with ``loss.kind=sampled`` and a local teacher, however the batch is split.

The ``kl`` metric cannot be the exact KL(p_s || p_t) here (that needs p_t over the vocabulary). ``kl_sum`` is the
sum over selected tokens of the single-sample estimate

    k[b,t] = log p_s(y) - log p_t(y),        E_{y ~ p_s}[k] = KL(p_s || p_t)

unbiased for untempered sampling (``esr.losses.sampled``), noisy per token, and able to go below 0.
"""

from __future__ import annotations

import torch
from torch import nn

from esr.config import LossConfig
from esr.losses import sampled_advantage, sampled_pg_loss, token_logprobs, token_mean_over_batch
from esr.models.forward import head_logits, response_hidden
from esr.train.remote_teacher import RemoteScorer
from esr.train.step import MicroBatchResult, loss_mask
from esr.types import Rollouts


def remote_micro_batch(
    student: nn.Module,
    scorer: RemoteScorer,
    rollouts: Rollouts,
    a: int,
    b: int,
    select_B_R: torch.Tensor,
    n_total: float,
    cfg: LossConfig,
    vocab_size: int,
    *,
    weight_B_R: torch.Tensor | None = None,
) -> MicroBatchResult:
    """Forward and backward of rows [a, b) of the step's batch ``rollouts``; gradients accumulate in the student.

    Args:
        student: the trained model.
        scorer: the remote teacher; its log p_t of the whole batch is fetched on the first call for ``rollouts``.
        rollouts: the WHOLE batch (the teacher is asked once per step); this call trains rows [a, b).
        a, b: the micro-batch's rows.
        select_B_R: bool (b - a, R_mb), the micro-batch's selected tokens (R_mb: its longest response).
        n_total: the loss's normaliser over the whole batch (``Selection.n_total``).
        cfg: ``loss`` config (``kind`` must be ``sampled``; ``chunk_size`` bounds the logits chunk).
        vocab_size: V, the logit columns both distributions are normalised over.
        weight_B_R: float position weights (b - a, R_mb), or None.

    Returns:
        ``MicroBatchResult``: this micro-batch's share of the loss, the sampled KL estimate summed over its
        selected tokens, and that estimate per position (b - a, R_mb) on the CPU.
    """
    if cfg.kind != "sampled":
        raise ValueError(f"a remote teacher gives sampled-token log-probs only: loss.kind must be sampled, "
                         f"not {cfg.kind}")
    mb = rollouts.slice(a, b)
    R = mb.response_mask_B_R.shape[1]
    teacher_logp_B_R = scorer.teacher_logprobs(rollouts)[a:b, :R]
    device = next(student.parameters()).device
    student_hidden_B_R_H = response_hidden(student, mb)
    leaf_B_R_H = student_hidden_B_R_H.detach().requires_grad_(True)
    tokens_B_R = mb.response_ids_B_R.to(device)
    teacher_logp_B_R = teacher_logp_B_R.to(device)
    select_B_R = select_B_R.to(device)
    loss_mask_B_R = loss_mask(select_B_R, weight_B_R)
    loss_total, kl_sum = 0.0, 0.0
    kl_B_R = torch.zeros(tokens_B_R.shape, dtype=torch.float32)
    for c in range(0, R, cfg.chunk_size):
        d = min(R, c + cfg.chunk_size)
        student_logits_B_T_V = head_logits(student, leaf_B_R_H[:, c:d], vocab_size)
        student_logp_B_T = token_logprobs(student_logits_B_T_V, tokens_B_R[:, c:d])
        del student_logits_B_T_V
        teacher_logp_B_T = teacher_logp_B_R[:, c:d].to(student_logp_B_T.dtype)
        values_B_T = sampled_pg_loss(student_logp_B_T, sampled_advantage(teacher_logp_B_T, student_logp_B_T))
        loss = token_mean_over_batch(values_B_T, loss_mask_B_R[:, c:d], n_total)
        if loss.requires_grad:
            loss.backward()
        with torch.no_grad():
            k_B_T = student_logp_B_T.detach() - teacher_logp_B_T
            k_B_T = torch.where(select_B_R[:, c:d], k_B_T, torch.zeros_like(k_B_T))
            kl_B_R[:, c:d] = k_B_T.float().cpu()
            kl_sum += float(k_B_T.sum())
        loss_total += float(loss.detach())
        del student_logp_B_T, values_B_T, loss
    if leaf_B_R_H.grad is not None:
        student_hidden_B_R_H.backward(leaf_B_R_H.grad)
    return MicroBatchResult(loss=loss_total, kl_sum=kl_sum, kl_B_R=kl_B_R)
