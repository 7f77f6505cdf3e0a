"""Exact per-position divergences between the student's and the teacher's next-token distributions.

Every function takes logits of shape (B, T, V) from both models at the same positions and returns one value per
position, shape (B, T), with no reduction: masking and averaging live in ``esr.losses.reduce``.

Numerics shared by all of them:
- Log-probabilities come from ``log_softmax`` computed in at least float32 (bf16/fp16 inputs are upcast; float64
  inputs stay float64, which the tests use for tight comparisons).
- A vocabulary entry whose probability under the *first* argument of a KL is exactly 0 (for example a ``-inf``
  logit, or a float32 underflow) contributes 0, following the convention 0 * log 0 = 0; it never produces NaN,
  neither in the value nor in the gradient.
- If the second argument of a KL gives probability 0 where the first has mass, the KL is ``+inf``. That is the
  correct value (the supports are incompatible), not a numerical accident; the training loop's non-finite check
  reports it. The gradient of such an infinite position is 0 (never NaN), so masking it out leaves the other
  positions' gradients intact.
- Gradients flow to whichever inputs require grad. The teacher is used as given: callers pass detached teacher
  logits (the scorer runs under ``torch.no_grad``), so only the student receives gradient.
"""

from __future__ import annotations

import math

import torch

__all__ = ["forward_kl", "jsd", "reverse_kl"]


def reverse_kl(student_logits_B_T_V: torch.Tensor, teacher_logits_B_T_V: torch.Tensor) -> torch.Tensor:
    """Reverse (mode-seeking) KL of the student from the teacher at every position; the OPD / ESR loss.

        KL(p_s || p_t) = sum_v p_s(v) * (log p_s(v) - log p_t(v)),   p = softmax(logits) over the last dim.

    Args:
        student_logits_B_T_V: student logits, (B, T, V), any float dtype.
        teacher_logits_B_T_V: teacher logits at the same positions, (B, T, V); pass them detached.

    Returns:
        kl_B_T: (B, T), float32 (float64 for float64 inputs), >= 0; ``+inf`` where the teacher gives probability 0
        to a token the student can sample.
    """
    logp_s, logp_t = _log_probs(student_logits_B_T_V, teacher_logits_B_T_V)
    return _kl(logp_s, logp_t)


def forward_kl(student_logits_B_T_V: torch.Tensor, teacher_logits_B_T_V: torch.Tensor) -> torch.Tensor:
    """Forward (mass-covering) KL of the teacher from the student at every position.

        KL(p_t || p_s) = sum_v p_t(v) * (log p_t(v) - log p_s(v))

    Args and returns as ``reverse_kl``; ``+inf`` where the student gives probability 0 to a teacher token.
    """
    logp_s, logp_t = _log_probs(student_logits_B_T_V, teacher_logits_B_T_V)
    return _kl(logp_t, logp_s)


def jsd(student_logits_B_T_V: torch.Tensor, teacher_logits_B_T_V: torch.Tensor, beta: float) -> torch.Tensor:
    """Skewed Jensen-Shannon divergence that moves continuously from forward KL (beta=0) to reverse KL (beta=1).

        m       = beta * p_t + (1 - beta) * p_s
        JSD_b   = beta * KL(p_s || m) + (1 - beta) * KL(p_t || m)        for 0 < beta < 1
        JSD_0   = KL(p_t || p_s)  (= forward_kl, returned exactly)
        JSD_1   = KL(p_s || p_t)  (= reverse_kl, returned exactly)

    Why this convention: as beta -> 0 the mixture m -> p_s, so the second term -> KL(p_t || p_s) and the first -> 0;
    as beta -> 1, m -> p_t and the first term -> KL(p_s || p_t). The family is therefore continuous on [0, 1] (error
    O(beta) near 0 and O(1 - beta) near 1, with a constant of the order of the chi-square divergence, so the KL is
    only approached once beta << min_v p_s(v) / p_t(v), resp. 1 - beta << min_v p_t(v) / p_s(v)); the endpoints are
    computed by the KL functions only to avoid 0 * log 0 terms. At beta = 0.5 it is the ordinary symmetric
    Jensen-Shannon divergence 0.5 * KL(p_s || m) + 0.5 * KL(p_t || m), m = (p_s + p_t) / 2, and in general
    ``jsd(s, t, beta) == jsd(t, s, 1 - beta)``.

    Difference from TRL's ``generalized_jsd_loss``: TRL uses the same mixture and the same endpoints, but weights the
    interior as beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), which tends to 0 (not to the KLs) as beta approaches
    either endpoint. Both agree at beta in {0, 0.5, 1}. Each term is bounded for 0 < beta < 1 (KL(p_t || m) <=
    -log(beta), KL(p_s || m) <= -log(1 - beta)), so the interior is finite even when the supports differ.

    Args:
        student_logits_B_T_V, teacher_logits_B_T_V: as in ``reverse_kl``.
        beta: in [0, 1]; the weight of the teacher in the mixture.

    Returns:
        jsd_B_T: (B, T), >= 0, float32 (float64 for float64 inputs).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits_B_T_V, teacher_logits_B_T_V)
    if beta == 1.0:
        return reverse_kl(student_logits_B_T_V, teacher_logits_B_T_V)
    logp_s, logp_t = _log_probs(student_logits_B_T_V, teacher_logits_B_T_V)
    # log m by logsumexp in log space: keeps full precision for tiny probabilities that exp() would underflow.
    # Where both models give probability 0 the mixture is 0 too; feed logsumexp zeros there instead of two -inf,
    # whose backward is exp(-inf - -inf) = NaN even when the incoming gradient is 0. Those entries are then
    # excluded by _kl because p_s = p_t = 0 there.
    both_zero = torch.isneginf(logp_s) & torch.isneginf(logp_t)
    terms_2_B_T_V = torch.stack((logp_t + math.log(beta), logp_s + math.log1p(-beta)))
    terms_2_B_T_V = torch.where(both_zero, torch.zeros_like(terms_2_B_T_V), terms_2_B_T_V)
    logm = torch.logsumexp(terms_2_B_T_V, dim=0)
    return beta * _kl(logp_s, logm) + (1.0 - beta) * _kl(logp_t, logm)


def _log_probs(
    student_logits_B_T_V: torch.Tensor, teacher_logits_B_T_V: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax of both inputs over the vocabulary, in at least float32."""
    if student_logits_B_T_V.shape != teacher_logits_B_T_V.shape:
        raise ValueError(
            "student and teacher logits must have the same shape (B, T, V), got "
            f"{tuple(student_logits_B_T_V.shape)} and {tuple(teacher_logits_B_T_V.shape)}; "
            "for different vocabularies align the tokens first (esr.teacher.align)"
        )
    dtype = torch.promote_types(student_logits_B_T_V.dtype, teacher_logits_B_T_V.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    logp_s = torch.log_softmax(student_logits_B_T_V.to(dtype), dim=-1)
    logp_t = torch.log_softmax(teacher_logits_B_T_V.to(dtype), dim=-1)
    return logp_s, logp_t


def _kl(logp_a_B_T_V: torch.Tensor, logp_b_B_T_V: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a(v) (log a(v) - log b(v)) from log-probabilities, with 0 * anything = 0.

    The log-ratio is zeroed where a(v) = 0 *before* multiplying, so neither the value (0 * -inf) nor the backward of
    the product (d/da = log-ratio = NaN for -inf - -inf) can produce NaN. A position where b(v) = 0 but a(v) > 0 is
    set to +inf through ``torch.where`` rather than computed as a(v) * inf: its gradient is then 0 instead of NaN,
    so an infinite position that a mask later drops cannot poison the gradient of the others.
    """
    p_a = logp_a_B_T_V.exp()
    has_mass = p_a > 0
    incompatible = has_mass & torch.isneginf(logp_b_B_T_V)
    log_ratio = torch.where(has_mass & ~incompatible, logp_a_B_T_V - logp_b_B_T_V, torch.zeros_like(p_a))
    finite_B_T = (p_a * log_ratio).sum(dim=-1)
    return torch.where(incompatible.any(dim=-1), torch.full_like(finite_B_T, float("inf")), finite_B_T)
