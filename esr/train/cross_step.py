"""The loss of one micro-batch when student and teacher have different tokenizers (see ``esr.teacher.cross``).

``aligned-exact`` (the paper's): only 1:1 groups whose two tokens are the same token are trained, with the exact
divergence over the shared vocabulary, renormalised. The teacher's hidden state at its partner position is moved to
the student's position, after which it is the same-tokenizer computation on the shared columns.

``span-sampled``: every group g (student tokens S_g, teacher tokens T_g, same text) is trained with the sampled
estimator at span level,

    A_g = log p_T(text_g | context) - log p_S(text_g | context)
        = sum_{j in T_g} log p_T(t_j) - sum_{i in S_g} log p_S(s_i)
    loss_i = -A_g * log p_S(s_i)  for i in S_g          (A_g detached)

so the gradient over a group is -A_g * grad log p_S(text_g), REINFORCE on the span with the teacher's span
log-likelihood as the reward. With identical tokenizers every group is one token and this is the token-level
``sampled`` loss. The logged KL is the sampled estimate -A_g, spread evenly over the group's tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from esr.config import LossConfig
from esr.losses import sampled_pg_loss, token_logprobs, token_mean_over_batch
from esr.models.forward import head_logits, response_hidden
from esr.teacher.cross import CrossBatch
from esr.teacher.score import TeacherScorer
from esr.teacher.vocab_map import VocabMap
from esr.train.step import MicroBatchResult, distill_micro_batch, loss_mask
from esr.types import Rollouts


def distill_aligned(
    student: nn.Module,
    scorer: TeacherScorer,
    rollouts: Rollouts,
    cross: CrossBatch,
    select_B_R: torch.Tensor,
    n_total: float,
    cfg: LossConfig,
    vocab_size: int,
    vocab_map: VocabMap,
    *,
    weight_B_R: torch.Tensor | None = None,
) -> MicroBatchResult:
    """``aligned-exact``: divergence on the shared vocabulary at exact 1:1 positions (``select_B_R`` & exact),
    each weighted by ``weight_B_R`` when given (as in ``distill_micro_batch``)."""
    teacher_hidden_B_R_H = scorer.score_aligned(cross)
    return distill_micro_batch(
        student, scorer, rollouts, select_B_R & cross.exact_B_R, n_total, cfg, vocab_size,
        weight_B_R=weight_B_R, teacher_hidden_B_R_H=teacher_hidden_B_R_H, vocab_map=vocab_map,
    )


def group_sum(values_B_T: torch.Tensor, group_B_T: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(B, G) sums of ``values`` over the positions of each group; positions with group -1 are left out."""
    out_B_G = torch.zeros((values_B_T.shape[0], n_groups), dtype=values_B_T.dtype, device=values_B_T.device)
    keep_B_T = group_B_T >= 0
    return out_B_G.scatter_add(1, group_B_T.clamp(min=0), torch.where(keep_B_T, values_B_T, 0.0))


def span_advantage(
    student_logp_B_R: torch.Tensor,
    teacher_logp_B_Rt: torch.Tensor,
    group_B_R: torch.Tensor,
    group_B_Rt: torch.Tensor,
    n_groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each student token's span advantage A_g (module docstring), and the span's KL estimate -A_g spread evenly
    over its student tokens; both (B, R), 0 on tokens in no group."""
    kl_B_G = group_sum(student_logp_B_R, group_B_R, n_groups) - group_sum(teacher_logp_B_Rt, group_B_Rt, n_groups)
    size_B_G = group_sum(torch.ones_like(student_logp_B_R), group_B_R, n_groups).clamp(min=1)
    index_B_R, in_group_B_R = group_B_R.clamp(min=0), group_B_R >= 0
    advantage_B_R = torch.where(in_group_B_R, -kl_B_G.gather(1, index_B_R), 0.0)
    kl_B_R = torch.where(in_group_B_R, (kl_B_G / size_B_G).gather(1, index_B_R), 0.0)
    return advantage_B_R, kl_B_R


@torch.no_grad()
def _chunked_logprobs(project, hidden_B_T_H: torch.Tensor, tokens_B_T: torch.Tensor, chunk: int) -> torch.Tensor:
    out = [token_logprobs(project(hidden_B_T_H[:, a : a + chunk]), tokens_B_T[:, a : a + chunk])
           for a in range(0, tokens_B_T.shape[1], chunk)]
    return torch.cat(out, dim=1) if out else tokens_B_T.new_zeros(tokens_B_T.shape, dtype=torch.float32)


def distill_span(
    student: nn.Module,
    scorer: TeacherScorer,
    rollouts: Rollouts,
    cross: CrossBatch,
    select_B_R: torch.Tensor,
    n_total: float,
    cfg: LossConfig,
    vocab_size: int,
    *,
    weight_B_R: torch.Tensor | None = None,
) -> MicroBatchResult:
    """``span-sampled``: span-level REINFORCE with advantage A_g (module docstring) on ``select_B_R`` & trainable,
    each token's term weighted by ``weight_B_R`` when given.

    Two head passes over the student's hidden states: one without grad for the span log-probs that make A_g
    (a span may straddle chunks), one with grad for the loss. Each holds at most B x chunk x V logits.
    """
    device = next(student.parameters()).device
    chunk, G = cfg.chunk_size, cross.n_groups
    teacher_hidden_B_Rt_H = scorer.score(cross.teacher)
    teacher_logp_B_Rt = _chunked_logprobs(scorer.logits, teacher_hidden_B_Rt_H,
                                          cross.teacher.response_ids_B_R.to(device), chunk)
    student_hidden_B_R_H = response_hidden(student, rollouts)
    leaf_B_R_H = student_hidden_B_R_H.detach().requires_grad_(True)
    tokens_B_R = rollouts.response_ids_B_R.to(device)
    group_B_R, group_B_Rt = cross.group_B_R.to(device), cross.group_B_Rt.to(device)
    select_B_R = select_B_R.to(device) & (group_B_R >= 0)
    loss_mask_B_R = loss_mask(select_B_R, weight_B_R)

    def project(h: torch.Tensor) -> torch.Tensor:
        return head_logits(student, h, vocab_size)

    student_logp_B_R = _chunked_logprobs(project, leaf_B_R_H.detach(), tokens_B_R, chunk)
    advantage_B_R, kl_B_R = span_advantage(student_logp_B_R, teacher_logp_B_Rt, group_B_R, group_B_Rt, G)
    kl_B_R = torch.where(select_B_R, kl_B_R, 0.0)

    loss_total = 0.0
    for a in range(0, tokens_B_R.shape[1], chunk):
        b = a + chunk
        logp_B_T = token_logprobs(project(leaf_B_R_H[:, a:b]), tokens_B_R[:, a:b])
        loss = token_mean_over_batch(sampled_pg_loss(logp_B_T, advantage_B_R[:, a:b]), loss_mask_B_R[:, a:b], n_total)
        if loss.requires_grad:
            loss.backward()
        loss_total += float(loss.detach())
    if leaf_B_R_H.grad is not None:
        student_hidden_B_R_H.backward(leaf_B_R_H.grad)
    return MicroBatchResult(loss=loss_total, kl_sum=float(kl_B_R.sum()), kl_B_R=kl_B_R.detach().cpu())
