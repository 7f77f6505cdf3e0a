"""The loss of one micro-batch, computed a time-chunk at a time, and its backward pass: one path for every teacher.

The teacher's side comes as ``TeacherTargets`` (``esr.teacher.targets``), made by whichever ``TeacherScorer`` the
session picked (local, across tokenizers, a server): per chunk of positions the targets turn the student's logits
into the per-token loss and KL. Nothing here asks which teacher it is.

Memory: the student's decoder runs once with grad, giving hidden states h_B_R_H. They are detached into a leaf;
each chunk of positions is projected to student and teacher logits (B x c x V), its loss is back-propagated into
the leaf at once and the chunk's logits are freed. Finally the accumulated leaf gradient is pushed through the
decoder in one backward. Peak logits memory is B x c x V per model, whatever the response length, with no recompute.

On-policy health: a rollout engine with its own copy of the weights (vLLM) returns its log-probs of the sampled
tokens (``Rollouts.logprobs_B_R``); each chunk compares them with the trainer's, delta = log p_trainer(y) -
log p_engine(y), and reports mean and max |delta| (different kernels, a bf16 engine, a stale adapter all show
here) over the rows the engine sampled: a teacher-sampled row (``rollout.teacher_share``) has NaN log-probs, no
delta and ratio 1. With ``loss.kind=sampled`` and ``loss.tis_cap`` C, each token's loss is weighted by the
truncated importance ratio min(exp(delta), C) (detached), the correction for sampling from the engine's
distribution rather than the trainer's (TRL's vllm_importance_sampling_cap). The exact-KL losses use the trainer's
forward over the whole vocabulary and need no correction.

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
from esr.losses import token_logprobs, token_mean_over_batch
from esr.models.forward import head_logits, response_hidden
from esr.teacher.targets import TeacherTargets, chunked_token_logprobs
from esr.train.memory import release_freed_memory
from esr.types import Rollouts


@dataclass
class MicroBatchResult:
    loss: float
    """This micro-batch's share of the batch loss (sums to the batch loss over micro-batches)."""
    kl_sum: float
    """Sum of the KL metric over selected tokens: exact KL(p_s || p_t) where the teacher gives its distribution,
    else the sampled estimate log p_s(y) - log p_t(y) (``esr.teacher.targets``)."""
    kl_B_R: torch.Tensor
    """Per-position KL metric, detached, on CPU; 0 where not selected."""
    engine_delta_sum: float = 0.0
    """Sum over response tokens of |log p_trainer(y) - log p_engine(y)| (0 when the engine gave no log-probs)."""
    engine_delta_max: float = 0.0
    """Max of that |delta| over the micro-batch's response tokens."""
    engine_tokens: int = 0
    """Response tokens the delta was measured on."""


def loss_mask(select_B_R: torch.Tensor, weight_B_R: torch.Tensor | None) -> torch.Tensor:
    """The mask the loss is reduced with: ``select_B_R`` itself (bool), or the weights on selected tokens (float)."""
    if weight_B_R is None:
        return select_B_R
    weight_B_R = weight_B_R.to(select_B_R.device)
    return torch.where(select_B_R, weight_B_R, torch.zeros_like(weight_B_R))


def distill_micro_batch(
    student: nn.Module,
    teacher: TeacherTargets,
    rollouts: Rollouts,
    select_B_R: torch.Tensor,
    n_total: float,
    cfg: LossConfig,
    vocab_size: int,
    *,
    weight_B_R: torch.Tensor | None = None,
) -> MicroBatchResult:
    """Forward and backward of one micro-batch; gradients accumulate into the student's parameters.

        loss = sum_{selected (b,t)} w[b,t] * loss[b,t] / n_total      (w = 1 when ``weight_B_R`` is None)

    Args:
        student: the trained model; rollouts: the micro-batch (b rows, R response positions).
        teacher: this micro-batch's teacher targets (``TeacherScorer.targets``); positions outside its
            ``trainable_B_R`` get no loss.
        select_B_R: bool (b, R), the selected tokens; weight_B_R: float position weights (b, R), or None.
        n_total: the loss's normaliser over the whole batch (``Selection.n_total``); vocab_size: V, the student's
            logit columns.
        cfg: ``loss`` config (``kind``; ``chunk_size`` bounds the logits chunk, b x chunk x V).
    """
    device = next(student.parameters()).device
    release_freed_memory(device)  # the teacher's activations (esr/train/memory.py)
    student_hidden_B_R_H = response_hidden(student, rollouts)
    release_freed_memory(device)  # the forward's temporaries; what backward needs stays
    health = EngineHealth(rollouts, device)
    leaf_B_R_H = student_hidden_B_R_H.detach().requires_grad_(True)
    tokens_B_R = rollouts.response_ids_B_R.to(device)
    select_B_R = select_B_R.to(device)
    if teacher.trainable_B_R is not None:
        select_B_R = select_B_R & teacher.trainable_B_R.to(device)
    loss_mask_B_R = loss_mask(select_B_R, weight_B_R)

    def project(hidden_B_T_H: torch.Tensor) -> torch.Tensor:
        return head_logits(student, hidden_B_T_H, vocab_size)

    teacher.begin(lambda: chunked_token_logprobs(project, leaf_B_R_H.detach(), tokens_B_R, cfg.chunk_size))
    R, loss_total, kl_sum = tokens_B_R.shape[1], 0.0, 0.0
    kl_B_R = torch.zeros(tokens_B_R.shape, dtype=torch.float32)
    for a in range(0, R, cfg.chunk_size):
        b = min(R, a + cfg.chunk_size)
        student_logits_B_T_V = project(leaf_B_R_H[:, a:b])
        values_B_T, kl_B_T = teacher.loss_terms(cfg, student_logits_B_T_V, tokens_B_R[:, a:b], a, b)
        values_B_T = health.update(student_logits_B_T_V, tokens_B_R[:, a:b], a, b, values_B_T, cfg)
        loss = token_mean_over_batch(values_B_T, loss_mask_B_R[:, a:b], n_total)
        if loss.requires_grad:
            loss.backward()
        with torch.no_grad():
            kl_B_T = torch.where(select_B_R[:, a:b], kl_B_T.detach(), torch.zeros_like(kl_B_T))
            kl_B_R[:, a:b] = kl_B_T.float().cpu()
            kl_sum += float(kl_B_T.sum())
        loss_total += float(loss.detach())
        del student_logits_B_T_V, values_B_T, kl_B_T, loss
    if leaf_B_R_H.grad is not None:
        student_hidden_B_R_H.backward(leaf_B_R_H.grad)
    return MicroBatchResult(loss=loss_total, kl_sum=kl_sum, kl_B_R=kl_B_R, engine_delta_sum=health.delta_sum,
                            engine_delta_max=health.delta_max, engine_tokens=health.tokens)


class EngineHealth:
    """The trainer-vs-engine log-prob comparison of one micro-batch, a chunk at a time (module docstring)."""

    def __init__(self, rollouts: Rollouts, device: torch.device) -> None:
        self.engine_logp_B_R = None if rollouts.logprobs_B_R is None else rollouts.logprobs_B_R.to(device)
        self.mask_B_R = rollouts.response_mask_B_R.to(device)
        if self.engine_logp_B_R is not None:  # NaN: no engine log-prob (a teacher-sampled row, esr/rollout/mixed.py)
            self.mask_B_R = self.mask_B_R & self.engine_logp_B_R.isfinite()
        self.delta_sum, self.delta_max, self.tokens = 0.0, 0.0, 0

    def update(self, student_logits_B_T_V: torch.Tensor, tokens_B_T: torch.Tensor, a: int, b: int,
               values_B_T: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
        """Add positions [a, b) to the tally and return the chunk's per-token loss ``values_B_T``, weighted by the
        truncated importance ratio min(exp(delta), loss.tis_cap) with ``loss.kind=sampled`` and a cap."""
        if self.engine_logp_B_R is None:
            return values_B_T
        ratio_B_T = self._delta(student_logits_B_T_V, tokens_B_T, a, b).exp()
        if cfg.kind == "sampled" and cfg.tis_cap is not None:
            return values_B_T * ratio_B_T.clamp(max=cfg.tis_cap)
        return values_B_T

    @torch.no_grad()
    def _delta(self, student_logits_B_T_V: torch.Tensor, tokens_B_T: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """delta = log p_trainer(y) - log p_engine(y) at positions [a, b) (0 off the response), tallied."""
        assert self.engine_logp_B_R is not None
        trainer_logp_B_T = token_logprobs(student_logits_B_T_V.detach(), tokens_B_T)
        mask_B_T = self.mask_B_R[:, a:b]
        delta_B_T = torch.where(mask_B_T, trainer_logp_B_T - self.engine_logp_B_R[:, a:b], 0.0)
        self.delta_sum += float(delta_B_T.abs().sum())
        self.delta_max = max(self.delta_max, float(delta_B_T.abs().max())) if delta_B_T.numel() else self.delta_max
        self.tokens += int(mask_B_T.sum())
        return delta_B_T
