"""Sampled-token estimator: log-prob gathering and unbiasedness of the policy-gradient surrogate."""

from __future__ import annotations

import pytest
import torch

from esr.losses import reverse_kl, sampled_advantage, sampled_pg_loss, token_logprobs


def test_token_logprobs_matches_log_softmax_gather() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 9, generator=gen) * 3
    tokens = torch.randint(0, 9, (3, 4), generator=gen)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    got = token_logprobs(logits, tokens)
    assert got.shape == (3, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    got_bf16 = token_logprobs(logits.bfloat16(), tokens)
    assert got_bf16.dtype == torch.float32
    expected_bf16 = torch.log_softmax(logits.bfloat16().double(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(got_bf16.double(), expected_bf16, rtol=1e-5, atol=1e-5)


def test_token_logprobs_gradient_matches_log_softmax() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 6, (2, 3), generator=gen)
    (got,) = torch.autograd.grad(token_logprobs(logits, tokens).sum(), logits)
    ref_value = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).sum()
    (ref,) = torch.autograd.grad(ref_value, logits)
    torch.testing.assert_close(got, ref)


def test_token_logprobs_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="disagree"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_advantage_is_detached_teacher_minus_student() -> None:
    student_logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    teacher_logp = torch.tensor([[-0.5, -3.0]])
    adv = sampled_advantage(teacher_logp, student_logp)
    assert not adv.requires_grad
    torch.testing.assert_close(adv, torch.tensor([[0.5, -1.0]]))
    loss = sampled_pg_loss(student_logp, adv)
    torch.testing.assert_close(loss, torch.tensor([[0.5, -2.0]]), check_dtype=False)
    loss.sum().backward()
    torch.testing.assert_close(student_logp.grad, -adv)


def _policy() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    theta = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_(True)
    teacher = torch.randn(5, generator=gen, dtype=torch.float64) * 1.5
    return theta, teacher


def _exact_kl_grad(theta: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(reverse_kl(theta.view(1, 1, 5), teacher.view(1, 1, 5)).sum(), theta)
    return grad


def _surrogate_grad(theta: torch.Tensor, teacher: torch.Tensor, tokens_N: torch.Tensor, weights_N: torch.Tensor):
    """Gradient of sum_n w_n * sampled_pg_loss(y_n) with the library's own log-prob and advantage functions."""
    n = tokens_N.numel()
    student_logp = token_logprobs(theta.expand(1, n, 5), tokens_N.view(1, n))
    teacher_logp = token_logprobs(teacher.expand(1, n, 5), tokens_N.view(1, n))
    loss = sampled_pg_loss(student_logp, sampled_advantage(teacher_logp, student_logp))
    (grad,) = torch.autograd.grad((loss * weights_N.view(1, n)).sum(), theta)
    return grad


def test_surrogate_expected_gradient_is_exact_kl_gradient_by_enumeration() -> None:
    theta, teacher = _policy()
    p_s = torch.softmax(theta.detach(), -1)
    expected_grad = _surrogate_grad(theta, teacher, torch.arange(5), p_s)  # E_y = sum_y p_s(y) * grad(y)
    torch.testing.assert_close(expected_grad, _exact_kl_grad(theta, teacher), rtol=1e-10, atol=1e-12)


def test_surrogate_gradient_is_unbiased_by_monte_carlo() -> None:
    theta, teacher = _policy()
    n = 200_000
    gen = torch.Generator().manual_seed(3)
    tokens = torch.multinomial(torch.softmax(theta.detach(), -1), n, replacement=True, generator=gen)
    mc_grad = _surrogate_grad(theta, teacher, tokens, torch.full((n,), 1.0 / n, dtype=torch.float64))
    exact = _exact_kl_grad(theta, teacher)
    # Per-sample gradients have std ~ 1 here, so the Monte-Carlo error is ~ 1/sqrt(n) ~ 2e-3.
    torch.testing.assert_close(mc_grad, exact, rtol=0, atol=1.5e-2)
    # The MC average of -advantage also estimates the KL value itself.
    student_logp = token_logprobs(theta.detach().expand(1, n, 5), tokens.view(1, n))
    teacher_logp = token_logprobs(teacher.expand(1, n, 5), tokens.view(1, n))
    kl_estimate = -sampled_advantage(teacher_logp, student_logp).mean()
    exact_kl = reverse_kl(theta.detach().view(1, 1, 5), teacher.view(1, 1, 5)).squeeze()
    torch.testing.assert_close(kl_estimate, exact_kl, rtol=0, atol=1.5e-2)
