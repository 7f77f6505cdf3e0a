"""Masked reductions: empty masks, poisoned padding, and gradient-accumulation invariance."""

from __future__ import annotations

import pytest
import torch

from esr.losses import masked_mean, masked_sum, reverse_kl, token_mean_over_batch


def test_masked_mean_and_sum_values() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, True, False]])
    assert masked_sum(values, mask).item() == 9.0
    assert masked_mean(values, mask).item() == 3.0
    assert masked_mean(values, mask.float()).item() == 3.0
    weights = torch.tensor([[0.5, 0.0, 0.0], [0.0, 1.5, 0.0]])
    assert masked_mean(values, weights).item() == pytest.approx((0.5 * 1 + 1.5 * 5) / 2.0)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_empty_mask_gives_zero_and_zero_gradient(dtype: torch.dtype) -> None:
    values = torch.randn(2, 3).requires_grad_(True)
    mask = torch.zeros(2, 3, dtype=dtype)
    for loss in (masked_mean(values, mask), masked_sum(values, mask), token_mean_over_batch(values, mask, 0)):
        assert loss.item() == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, values)
        assert torch.equal(grad, torch.zeros(2, 3))


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_nan_and_inf_at_masked_positions_are_ignored(dtype: torch.dtype) -> None:
    values = torch.tensor([[1.0, float("nan")], [float("inf"), 3.0]], requires_grad=True)
    mask = torch.tensor([[1, 0], [0, 1]], dtype=dtype)
    loss = masked_mean(values, mask)
    assert loss.item() == 2.0
    loss.backward()
    assert torch.equal(values.grad, torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
    assert token_mean_over_batch(values, mask, 4).item() == 1.0


def test_shape_mismatch_and_negative_count_are_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        masked_mean(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_total must be >= 0, got -1"):
        token_mean_over_batch(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), -1)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 6, 7, generator=gen)
    teacher = torch.randn(4, 6, 7, generator=gen)
    lengths = torch.tensor([6, 1, 4, 2])  # different valid response lengths per row
    mask = torch.arange(6)[None, :] < lengths[:, None]
    return student, teacher, mask


def _grad_of_split(sizes: list[int], per_micro: str) -> torch.Tensor:
    student, teacher, mask = _batch()
    student.requires_grad_(True)
    n_total = int(mask.sum())
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        values = reverse_kl(student[rows], teacher[rows])
        if per_micro == "token_mean_over_batch":
            loss = token_mean_over_batch(values, mask[rows], n_total)
        else:  # the common mistake: average of per-micro-batch means
            loss = masked_mean(values, mask[rows]) / len(sizes)
        loss.backward()
        start += size
    assert start == 4
    return student.grad


@pytest.mark.parametrize("sizes", [[1, 3], [2, 2], [4], [1, 1, 1, 1]])
def test_gradient_accumulation_matches_unsplit_batch(sizes: list[int]) -> None:
    student, teacher, mask = _batch()
    student.requires_grad_(True)
    masked_mean(reverse_kl(student, teacher), mask).backward()
    torch.testing.assert_close(_grad_of_split(sizes, "token_mean_over_batch"), student.grad, rtol=1e-5, atol=1e-7)


def test_averaging_micro_batch_means_is_not_invariant() -> None:
    # Guards the test above: the naive normalisation really does differ on this batch.
    assert not torch.allclose(_grad_of_split([1, 3], "masked_mean"), _grad_of_split([4], "masked_mean"), atol=1e-4)


def test_infinite_kl_at_a_padded_position_does_not_poison_the_gradient() -> None:
    student, teacher, mask = _batch()
    student.requires_grad_(True)
    teacher[3, 4, 0] = float("-inf")  # a padded position where KL(p_s || p_t) = +inf
    values = reverse_kl(student, teacher)
    assert torch.isinf(values[3, 4])
    loss = masked_mean(values, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert torch.equal(student.grad[~mask], torch.zeros_like(student.grad[~mask]))
