"""Top-k + tail reverse KL against a float64 reference written out bucket by bucket, and its gradient."""

from __future__ import annotations

import math

import pytest
import torch

from esr.losses import mask_top_columns, reverse_kl, topk_reverse_kl


def _reference(student_V: list[float], teacher_V: list[float], k: int) -> float:
    """KL over the teacher's top-k buckets plus the tail, one position, plain Python floats (float64)."""
    def softmax(x: list[float]) -> list[float]:
        top = max(x)
        e = [math.exp(v - top) for v in x]
        return [v / sum(e) for v in e]

    q, p = softmax(student_V), softmax(teacher_V)
    top = sorted(range(len(p)), key=lambda v: -p[v])[:k]
    total = sum(q[v] * (math.log(q[v]) - math.log(p[v])) for v in top)
    q_tail, p_tail = 1.0 - sum(q[v] for v in top), 1.0 - sum(p[v] for v in top)
    if q_tail > 0:
        total += q_tail * (math.log(q_tail) - math.log(p_tail))
    return total


def _teacher_topk(teacher_B_T_V: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    logp, ids = torch.log_softmax(teacher_B_T_V, -1).topk(k, dim=-1)
    return ids, logp


CASES = {
    "generic": ([[0.3, -1.2, 2.0, 0.5, -0.4, 1.1]], [[1.5, 0.2, -0.3, 2.2, -1.0, 0.0]]),
    # The teacher's top-2 hold all but ~1e-4 of its mass; the student is spread out.
    "top-k covers almost all mass": ([[0.0, 0.5, -0.5, 0.2, 0.1, -0.3]], [[9.0, 9.5, 0.0, -0.5, 0.3, -1.0]]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("k", [1, 2, 4])
def test_matches_the_bucket_by_bucket_reference(case, k):
    student, teacher = (torch.tensor([rows], dtype=torch.float64) for rows in CASES[case])
    ids, logp = _teacher_topk(teacher, k)
    got = topk_reverse_kl(student, ids, logp)
    assert got.shape == (1, 1) and got.dtype == torch.float64
    want = _reference(CASES[case][0][0], CASES[case][1][0], k)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert got.item() >= 0


def test_k_equal_to_v_is_the_exact_reverse_kl_with_an_empty_tail():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 7, dtype=torch.float64), torch.randn(2, 3, 7, dtype=torch.float64)
    ids, logp = _teacher_topk(teacher, 7)
    got = topk_reverse_kl(student.requires_grad_(True), ids, logp)
    torch.testing.assert_close(got, reverse_kl(student, teacher), atol=1e-9, rtol=0)
    got.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_fewer_buckets_never_exceed_the_exact_kl_and_float32_agrees():
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 5, 50, dtype=torch.float64) * 2, torch.randn(3, 5, 50, dtype=torch.float64) * 2
    exact = reverse_kl(student, teacher)
    for k in (1, 5, 20):
        ids, logp = _teacher_topk(teacher, k)
        got = topk_reverse_kl(student, ids, logp)
        assert (got <= exact + 1e-12).all()  # merging outcomes never increases a KL
        got32 = topk_reverse_kl(student.float(), ids, logp.float())
        assert got32.dtype == torch.float32
        torch.testing.assert_close(got32.double(), got, atol=1e-5, rtol=1e-4)


def test_a_numerically_empty_tail_gives_finite_values_and_gradients():
    # Both models put ~all mass on token 0: the tails are ~e^-60, below float32's and float64's resolution of 1 - x.
    student = torch.tensor([[[60.0, 0.0, 0.0, 0.0]]], dtype=torch.float32, requires_grad=True)
    teacher = torch.tensor([[[70.0, 0.0, 0.0, 0.0]]], dtype=torch.float32)
    ids, logp = _teacher_topk(teacher, 1)
    loss = topk_reverse_kl(student, ids, logp)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_gradcheck_in_float64():
    torch.manual_seed(2)
    student = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 6, dtype=torch.float64) * 3
    for k in (1, 3, 5):
        ids, logp = _teacher_topk(teacher, k)
        assert torch.autograd.gradcheck(lambda s, i=ids, lp=logp: topk_reverse_kl(s, i, lp), (student,))


def test_no_gradient_reaches_the_teacher():
    student = torch.randn(1, 2, 5, requires_grad=True)
    logp = torch.log_softmax(torch.randn(1, 2, 5), -1).topk(2, dim=-1)
    teacher_logp = logp.values.clone().requires_grad_(True)
    topk_reverse_kl(student, logp.indices, teacher_logp).sum().backward()
    assert teacher_logp.grad is None and student.grad is not None


def test_ids_outside_the_students_columns_move_their_mass_to_the_tail():
    """A teacher with a wider output layer: its top id 6 is not one of the student's 6 columns."""
    student = torch.tensor([[[0.1, 0.7, -0.2, 0.4, 0.0, -1.0]]], dtype=torch.float64, requires_grad=True)
    teacher_V7 = torch.tensor([[[0.5, 2.0, -1.0, 0.3, 0.0, -0.5, 3.0]]], dtype=torch.float64)
    ids, logp = _teacher_topk(teacher_V7, 3)
    assert ids[0, 0, 0].item() == 6
    ids, logp = mask_top_columns(ids, logp, vocab_size=6)
    assert ids[0, 0, 0].item() == 0 and logp[0, 0, 0].item() == -math.inf
    got = topk_reverse_kl(student, ids, logp)
    got.sum().backward()
    # Reference: buckets {1, 0} (the top-3 ids inside the student's columns) and a tail holding the rest,
    # id 6's teacher mass included.
    q = torch.softmax(student.detach()[0, 0], -1)
    p = torch.softmax(teacher_V7[0, 0], -1)
    want = sum(q[v] * (q[v].log() - p[v].log()) for v in (1, 0))
    q_tail, p_tail = 1 - q[0] - q[1], 1 - p[0] - p[1]
    want = want + q_tail * (q_tail.log() - p_tail.log())
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    assert torch.isfinite(student.grad).all()
