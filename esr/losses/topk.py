"""Top-k reverse KL: the divergence over the teacher's k most likely tokens plus one tail bucket.

What a teacher engine that returns only its top-k log-probabilities (vLLM's ``prompt_logprobs``) can train; TRL's
``loss_top_k`` with ``loss_add_tail``. At each position, with S the teacher's top-k token ids:

    buckets    b in S  u  {tail}
    q_s(b)   = softmax(student logits)[b]   for b in S,      q_s(tail) = 1 - sum_{b in S} q_s(b)
    p_t(b)   = exp(teacher top-k log-prob of b)              p_t(tail) = 1 - sum_{b in S} p_t(b)
    loss     = sum_b q_s(b) * (log q_s(b) - log p_t(b))      (KL of the two (k+1)-bucket distributions, >= 0)

The teacher's log-probs are normalised over its whole vocabulary (as vLLM gives them), so the tail holds the mass
of every other token. With S = the whole vocabulary both tails are empty and the loss is the exact reverse KL; as
k shrinks it lower-bounds it (merging outcomes never increases a KL). A tail's log is computed stably,

    log q(tail) = log1p(-exp(logsumexp_{b in S} log q(b)))     (log(-expm1(x)) where it is more accurate),

with the sum clamped just below 1, so a numerically empty tail gives q(tail) log(q(tail)/p(tail)) ~ 0 with finite
gradients, never NaN or inf. Gradient flows through the student's logits only.

Entries whose teacher log-prob is -inf are not buckets on either side (a top id outside the student's columns,
``mask_top_columns``): their teacher mass stays in the teacher's tail, their student mass in the student's.
"""

from __future__ import annotations

import math

import torch

__all__ = ["log1m_exp", "mask_top_columns", "topk_reverse_kl"]

TAIL_EPS = 1e-6
"""log of the largest in-bucket mass is clamped to log(1 - TAIL_EPS): the tail never has log -inf. A tail below it
counts as TAIL_EPS (a change of the loss below ~TAIL_EPS * |log ratio of the tails|)."""
FLOOR = -1e30
"""The log-prob a non-bucket entry holds inside the computation: exp(FLOOR) = 0, finite in float32 and float64."""


def log1m_exp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(logp)) for logp <= 0, stable at both ends (Maechler 2012): log(-expm1(x)) for x > -log 2, else
    log1p(-exp(x)). ``logp`` is clamped to <= log(1 - TAIL_EPS) first, so the result is finite."""
    x = logp.clamp(max=math.log1p(-TAIL_EPS))
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_reverse_kl(student_logits_B_T_V: torch.Tensor, teacher_top_ids_B_T_K: torch.Tensor,
                    teacher_top_logp_B_T_K: torch.Tensor) -> torch.Tensor:
    """KL(q_s || p_t) over the teacher's top-k buckets plus the tail, per position (the module docstring).

    Args:
        student_logits_B_T_V: the student's logits, any float dtype; the gradient flows into them.
        teacher_top_ids_B_T_K: int64 ids of the teacher's k most likely tokens, in [0, V) (an entry masked by a
            -inf log-prob may hold any valid id).
        teacher_top_logp_B_T_K: the teacher's log-probs of those tokens (normalised over its whole vocabulary),
            -inf for entries that are not buckets; no gradient flows into them.

    Returns:
        loss_B_T in the promoted float dtype (at least float32), >= 0 up to rounding.
    """
    if student_logits_B_T_V.shape[:-1] != teacher_top_ids_B_T_K.shape[:-1]:
        raise ValueError(f"topk_reverse_kl: logits {tuple(student_logits_B_T_V.shape)} and top ids "
                         f"{tuple(teacher_top_ids_B_T_K.shape)} disagree on (B, T)")
    dtype = torch.promote_types(student_logits_B_T_V.dtype, torch.float32)
    logits_B_T_V = student_logits_B_T_V.to(dtype)
    bucket_B_T_K = torch.isfinite(teacher_top_logp_B_T_K)
    # Non-buckets hold a finite floor, never -inf: no inf - inf (NaN) in any branch torch.where back-propagates into.
    student_B_T_K = logits_B_T_V.gather(-1, teacher_top_ids_B_T_K) - torch.logsumexp(logits_B_T_V, -1, keepdim=True)
    student_B_T_K = torch.where(bucket_B_T_K, student_B_T_K, FLOOR)
    teacher_B_T_K = torch.where(bucket_B_T_K, teacher_top_logp_B_T_K.detach().to(dtype), FLOOR)
    in_buckets_B_T = torch.where(bucket_B_T_K, student_B_T_K.exp() * (student_B_T_K - teacher_B_T_K), 0.0).sum(-1)
    student_tail_B_T = log1m_exp(torch.logsumexp(student_B_T_K, dim=-1))
    teacher_tail_B_T = log1m_exp(torch.logsumexp(teacher_B_T_K, dim=-1))
    return in_buckets_B_T + student_tail_B_T.exp() * (student_tail_B_T - teacher_tail_B_T)


def mask_top_columns(top_ids_B_R_K: torch.Tensor, top_logp_B_R_K: torch.Tensor,
                     vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k entries whose id is outside the student's ``vocab_size`` columns (a teacher with a wider output layer)
    become non-buckets: id 0, log-prob -inf. Their teacher mass then counts in the teacher's tail."""
    outside_B_R_K = top_ids_B_R_K >= vocab_size
    if not bool(outside_B_R_K.any()):
        return top_ids_B_R_K, top_logp_B_R_K
    return (top_ids_B_R_K.masked_fill(outside_B_R_K, 0),
            top_logp_B_R_K.masked_fill(outside_B_R_K, -math.inf))
