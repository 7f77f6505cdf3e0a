"""Exact divergences against float64 references written as explicit loops over the vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from esr.losses import DIVERGENCES, forward_kl, jsd, reverse_kl

NEG_INF = float("-inf")


def _naive_log_probs(logits_V: torch.Tensor) -> list[torch.Tensor]:
    """log softmax of one position, one vocabulary entry at a time (float64, differentiable)."""
    finite = [x for x in logits_V if x.item() != NEG_INF]
    top = max(x.item() for x in finite)
    z = sum(torch.exp(x - top) for x in finite)
    return [x - top - torch.log(z) for x in logits_V]


def _naive_kl_position(logp_a: list[torch.Tensor], logp_b: list[torch.Tensor]) -> torch.Tensor:
    """sum_v a(v) (log a(v) - log b(v)), skipping a(v) == 0."""
    total = torch.zeros((), dtype=torch.float64)
    for la, lb in zip(logp_a, logp_b, strict=True):
        if la.item() == NEG_INF:
            continue
        total = total + torch.exp(la) * (la - lb)
    return total


def _naive_mix(logp_s: list[torch.Tensor], logp_t: list[torch.Tensor], beta: float) -> list[torch.Tensor]:
    return [torch.log(beta * torch.exp(lt) + (1 - beta) * torch.exp(ls)) for ls, lt in zip(logp_s, logp_t, strict=True)]


def naive_divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Float64 reference for reverse_kl / forward_kl / jsd on (B, T, V) logits, with Python loops."""
    student, teacher = student.double(), teacher.double()
    B, T, _ = student.shape
    rows = []
    for b in range(B):
        row = []
        for t in range(T):
            ls, lt = _naive_log_probs(student[b, t]), _naive_log_probs(teacher[b, t])
            if kind == "reverse_kl":
                row.append(_naive_kl_position(ls, lt))
            elif kind == "forward_kl":
                row.append(_naive_kl_position(lt, ls))
            else:
                lm = _naive_mix(ls, lt, beta)
                row.append(beta * _naive_kl_position(ls, lm) + (1 - beta) * _naive_kl_position(lt, lm))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def _logits(seed: int, shape: tuple[int, ...] = (2, 3, 7), scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * scale, torch.randn(shape, generator=gen) * scale


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl"])
def test_kl_matches_naive_reference(kind: str) -> None:
    student, teacher = _logits(0)
    got = DIVERGENCES[kind](student, teacher)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_divergence(student, teacher, kind), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_interior_matches_naive_reference(beta: float) -> None:
    student, teacher = _logits(1)
    got = jsd(student, teacher, beta)
    torch.testing.assert_close(got.double(), naive_divergence(student, teacher, "jsd", beta), rtol=1e-5, atol=1e-6)


def test_reverse_and_forward_kl_are_different_directions() -> None:
    student, teacher = _logits(2)
    torch.testing.assert_close(reverse_kl(student, teacher), forward_kl(teacher, student))
    assert not torch.allclose(reverse_kl(student, teacher), forward_kl(student, teacher), rtol=1e-3)


@pytest.mark.parametrize("fn", [reverse_kl, forward_kl, lambda s, t: jsd(s, t, 0.3)])
def test_zero_for_identical_and_nonnegative(fn) -> None:
    student, teacher = _logits(3, shape=(4, 5, 11), scale=4.0)
    assert fn(student, student).abs().max().item() < 1e-6
    # Shifting every logit of a position by a constant leaves the distribution unchanged.
    assert fn(student, student + 3.0).abs().max().item() < 1e-5
    assert fn(student, teacher).min().item() >= 0.0


def test_jsd_endpoints_are_exactly_the_kls() -> None:
    student, teacher = _logits(4)
    assert torch.equal(jsd(student, teacher, 0.0), forward_kl(student, teacher))
    assert torch.equal(jsd(student, teacher, 1.0), reverse_kl(student, teacher))


def test_jsd_is_continuous_at_both_endpoints() -> None:
    student, teacher = _logits(5)
    student, teacher = student.double(), teacher.double()
    fkl, rkl = forward_kl(student, teacher), reverse_kl(student, teacher)
    betas = (1e-4, 1e-5, 1e-6)
    errs_0 = [(jsd(student, teacher, b) - fkl).abs().max().item() for b in betas]
    errs_1 = [(jsd(student, teacher, 1 - b) - rkl).abs().max().item() for b in betas]
    for errs in (errs_0, errs_1):
        # The gap is O(beta): it shrinks ~10x per decade (these KLs are 0.6 to 8 nats).
        assert errs[0] > errs[1] > errs[2]
        assert errs[2] < 1e-2 and errs[1] / errs[2] > 5


def test_jsd_swap_symmetry_and_symmetric_at_half() -> None:
    student, teacher = _logits(6)
    torch.testing.assert_close(jsd(student, teacher, 0.5), jsd(teacher, student, 0.5))
    torch.testing.assert_close(jsd(student, teacher, 0.2), jsd(teacher, student, 0.8))
    # Standard Jensen-Shannon divergence is bounded by log 2.
    assert jsd(student, teacher, 0.5).max().item() <= math.log(2) + 1e-6


def test_jsd_rejects_beta_outside_unit_interval() -> None:
    student, teacher = _logits(7)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        jsd(student, teacher, 1.5)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="same shape"):
        reverse_kl(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))


def test_low_precision_inputs_are_computed_in_float32() -> None:
    student, teacher = _logits(8)
    got = reverse_kl(student.bfloat16(), teacher.bfloat16())
    assert got.dtype == torch.float32
    ref = naive_divergence(student.bfloat16().float(), teacher.bfloat16().float(), "reverse_kl")
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.0), ("forward_kl", 0.0), ("jsd", 0.3)])
def test_gradient_matches_autograd_on_naive_reference(kind: str, beta: float) -> None:
    student, teacher = _logits(9, shape=(2, 2, 5))
    student = student.double().requires_grad_(True)
    weights = torch.randn(2, 2, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    fn = DIVERGENCES[kind]
    got = fn(student, teacher.double(), beta) if kind == "jsd" else fn(student, teacher.double())
    (grad,) = torch.autograd.grad((got * weights).sum(), student)
    ref = naive_divergence(student, teacher, kind, beta)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), student)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_teacher_receives_no_gradient_when_detached() -> None:
    student, teacher = _logits(11)
    student.requires_grad_(True)
    teacher_param = teacher.clone().requires_grad_(True)
    reverse_kl(student, teacher_param.detach()).sum().backward()
    assert student.grad is not None and teacher_param.grad is None


def _with_neg_inf() -> tuple[torch.Tensor, torch.Tensor]:
    student, teacher = _logits(12, shape=(1, 3, 5))
    student[0, 0, 1] = NEG_INF  # student-only zero: teacher still has mass there
    student[0, 1, 2] = NEG_INF  # both zero at the same entry
    teacher[0, 1, 2] = NEG_INF
    teacher[0, 2, 4] = NEG_INF  # teacher-only zero
    return student, teacher


def test_neg_inf_logits_reverse_kl() -> None:
    student, teacher = _with_neg_inf()
    student.requires_grad_(True)
    kl = reverse_kl(student, teacher)
    ref = naive_divergence(student.detach(), teacher, "reverse_kl")
    # Positions 0 and 1: zero student probability contributes 0, finite and equal to the reference.
    torch.testing.assert_close(kl[0, :2].double(), ref[0, :2], rtol=1e-5, atol=1e-6)
    # Position 2: the student puts mass where the teacher has none: KL(p_s || p_t) = +inf, not NaN.
    assert kl[0, 2].item() == float("inf")
    # Backward through ALL positions, the infinite one included, as a mask applied later would: no NaN anywhere,
    # and the infinite position contributes no gradient.
    kl.sum().backward()
    assert torch.isfinite(student.grad).all()
    assert torch.equal(student.grad[0, 2], torch.zeros(5))
    assert student.grad[0, 0, 1].item() == 0.0 and student.grad[0, 1, 2].item() == 0.0


def test_neg_inf_logits_forward_kl() -> None:
    student, teacher = _with_neg_inf()
    student.requires_grad_(True)
    kl = forward_kl(student, teacher)
    assert kl[0, 0].item() == float("inf")  # teacher mass on a token the student can never produce
    ref = naive_divergence(student.detach(), teacher, "forward_kl")
    torch.testing.assert_close(kl[0, 1:].double(), ref[0, 1:], rtol=1e-5, atol=1e-6)
    kl.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_neg_inf_logits_jsd_is_finite_with_finite_gradient() -> None:
    student, teacher = _with_neg_inf()
    student.requires_grad_(True)
    value = jsd(student, teacher, 0.4)
    assert torch.isfinite(value).all()
    ref = naive_divergence(student.detach(), teacher, "jsd", 0.4)
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-6)
    value.sum().backward()
    assert torch.isfinite(student.grad).all()
