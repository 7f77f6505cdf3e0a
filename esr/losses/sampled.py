"""Sampled-token reverse KL: the estimator for when only the log-probabilities of the sampled tokens are known.

For an on-policy token y_t ~ p_s(. | x, y_<t) the single-sample estimate of the per-position reverse KL is

    k_t = log p_s(y_t) - log p_t(y_t),      E_{y_t ~ p_s}[k_t] = KL(p_s || p_t).

Training uses it as a REINFORCE problem with per-token advantage A_t = -k_t = log p_t(y_t) - log p_s(y_t)
(the teacher "rewards" tokens it finds likelier than the student does), as tinker-cookbook's
``distillation/train_on_policy.py`` does. Why the surrogate below has the right gradient, for one position:

    grad_s E_{y ~ p_s}[log p_s(y) - log p_t(y)]
      = sum_y grad p_s(y) * (log p_s(y) - log p_t(y))  +  sum_y p_s(y) * grad log p_s(y)
      = E_y[(log p_s(y) - log p_t(y)) * grad log p_s(y)]  +  E_y[grad log p_s(y)]
      = E_y[-A(y) * grad log p_s(y)]  +  0,

because E_y[grad log p_s(y)] = grad sum_y p_s(y) = grad 1 = 0. So with A held fixed (detached),
``loss = -A * log p_s(y)`` has expected gradient equal to the gradient of the exact KL(p_s || p_t): it is an
unbiased (but noisy) estimate of the full-vocabulary loss's gradient, which ``tests/losses`` checks by Monte Carlo.
The estimate is only unbiased for tokens sampled from the same distribution p_s that is being trained (untempered
sampling, current weights); sampling at temperature 0.7 makes it a biased but standard approximation.
"""

from __future__ import annotations

import torch

__all__ = ["sampled_advantage", "sampled_pg_loss", "token_logprobs"]


def token_logprobs(logits_B_T_V: torch.Tensor, tokens_B_T: torch.Tensor) -> torch.Tensor:
    """Log-probability of the given token at every position, in at least float32.

        logp[b, t] = logits[b, t, tokens[b, t]] - logsumexp_v logits[b, t, v]

    The full log-softmax is never materialised: the token's logit is gathered and the normaliser is computed one
    batch row at a time, so a bf16 input never becomes a full (B, T, V) float32 copy (peak extra memory: one (T, V)
    float32 row).

    Args:
        logits_B_T_V: logits whose position t predicts ``tokens_B_T[:, t]``, (B, T, V), any float dtype.
        tokens_B_T: int64 token ids in [0, V), (B, T). Padded positions must still hold a valid id (for example the
            pad id); mask them out afterwards.

    Returns:
        logp_B_T: (B, T), float32 (float64 for float64 logits), <= 0.
    """
    if logits_B_T_V.shape[:-1] != tokens_B_T.shape:
        raise ValueError(
            f"token_logprobs: logits (B, T, V) {tuple(logits_B_T_V.shape)} and tokens (B, T) {tuple(tokens_B_T.shape)} "
            "disagree on (B, T)"
        )
    dtype = torch.promote_types(logits_B_T_V.dtype, torch.float32)
    picked_B_T = logits_B_T_V.gather(-1, tokens_B_T.unsqueeze(-1)).squeeze(-1).to(dtype)
    if logits_B_T_V.shape[0] == 0:
        return picked_B_T
    logz_B_T = torch.stack([torch.logsumexp(row_T_V.to(dtype), dim=-1) for row_T_V in logits_B_T_V])
    return picked_B_T - logz_B_T


def sampled_advantage(teacher_logp_B_T: torch.Tensor, student_logp_B_T: torch.Tensor) -> torch.Tensor:
    """Per-token advantage for sampled-token distillation, detached.

        A_t = log p_t(y_t) - log p_s(y_t)      (minus the single-sample estimate of KL(p_s || p_t))

    Args:
        teacher_logp_B_T: teacher log-probabilities of the sampled tokens, (B, T).
        student_logp_B_T: student log-probabilities of the same tokens, (B, T).

    Returns:
        advantage_B_T: (B, T), detached (no gradient flows through it).
    """
    return (teacher_logp_B_T - student_logp_B_T).detach()


def sampled_pg_loss(student_logp_B_T: torch.Tensor, advantage_B_T: torch.Tensor) -> torch.Tensor:
    """REINFORCE surrogate whose gradient is an unbiased estimate of grad KL(p_s || p_t) (see the module docstring).

        loss_t = -A_t * log p_s(y_t),    grad loss_t = (log p_s(y_t) - log p_t(y_t)) * grad log p_s(y_t)

    Its value is not the KL; log ``-advantage`` (the sampled KL estimate) for that.

    Args:
        student_logp_B_T: student log-probabilities of the sampled tokens, with grad, (B, T).
        advantage_B_T: from ``sampled_advantage``, (B, T); detached here again so it can never carry gradient.

    Returns:
        loss_B_T: (B, T), no reduction.
    """
    return -advantage_B_T.detach() * student_logp_B_T
