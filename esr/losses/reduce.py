"""Masked reductions of per-token values, including the normalisation that makes gradient accumulation exact.

A mask is bool (True = token counts) or float (a per-token weight; 0/1 in the usual case). Positions the mask
excludes may hold anything, ``inf`` and ``NaN`` included (padding, positions past a truncated rollout): values are
selected with ``torch.where``, never multiplied by a 0 mask, because 0 * NaN = NaN. The gradient reaching an excluded
position is exactly 0. (If the op that *produced* a NaN there has an infinite local derivative, autograd can still
make 0 * inf = NaN upstream of this module; keep producers finite on padding when they feed trainable weights.)
"""

from __future__ import annotations

import torch

__all__ = ["masked_mean", "masked_sum", "token_mean_over_batch"]


def masked_sum(values_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """Sum of the selected values: sum_{b,t} mask[b,t] * values[b,t], with excluded positions ignored entirely.

    Args:
        values_B_T: per-token values, (B, T) (any shape equal to the mask's works).
        mask_B_T: bool or float weights, same shape.

    Returns:
        A 0-dim tensor, connected to ``values_B_T``'s graph (also when the mask is empty: then it is 0).
    """
    if values_B_T.shape != mask_B_T.shape:
        raise ValueError(f"values {tuple(values_B_T.shape)} and mask {tuple(mask_B_T.shape)} must have the same shape")
    zero = torch.zeros((), dtype=values_B_T.dtype, device=values_B_T.device)
    if mask_B_T.dtype == torch.bool:
        return torch.where(mask_B_T, values_B_T, zero).sum()
    return torch.where(mask_B_T != 0, values_B_T * mask_B_T, zero).sum()


def masked_mean(values_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """Mean of the selected values (weighted mean for a float mask).

        masked_mean = sum(mask * values) / sum(mask),   and exactly 0 when sum(mask) == 0

    The empty case returns 0 (never NaN) that is still connected to the graph, so ``backward()`` works and gives
    all-zero gradients: a micro-batch whose every token was masked out contributes nothing, without a special case.

    Args:
        values_B_T: per-token values, (B, T).
        mask_B_T: bool or float weights, same shape.

    Returns:
        A 0-dim tensor.
    """
    total = masked_sum(values_B_T, mask_B_T)
    count = mask_B_T.sum().to(total.dtype)
    return total / torch.where(count != 0, count, torch.ones_like(count))


def token_mean_over_batch(
    values_B_T: torch.Tensor, mask_B_T: torch.Tensor, n_total: int | float | torch.Tensor
) -> torch.Tensor:
    """A micro-batch's share of the token mean of a whole batch, for gradient accumulation.

        loss_micro = sum_{b,t in micro} mask * values / n_total,   n_total = sum of the mask over the WHOLE batch

    Summing ``loss_micro`` (or accumulating its gradients) over any split of the batch into micro-batches gives
    exactly ``masked_mean`` of the unsplit batch. Averaging each micro-batch's own ``masked_mean`` does not: it
    over-weights tokens of micro-batches with few selected tokens, so the loss would depend on
    ``train.micro_batch_size``. Under data parallelism, ``n_total`` is the count summed over all ranks (and the
    gradients are summed, not averaged, across ranks).

    Args:
        values_B_T: per-token values of this micro-batch, (B_micro, T).
        mask_B_T: its bool or float mask, same shape.
        n_total: selected tokens (sum of the mask) in the whole batch; >= 0. When it is 0 the result is 0.

    Returns:
        A 0-dim tensor, connected to the graph.
    """
    if not isinstance(n_total, torch.Tensor) and n_total < 0:
        raise ValueError(f"token_mean_over_batch: n_total must be >= 0, got {n_total}")
    total = masked_sum(values_B_T, mask_B_T)
    n = torch.as_tensor(n_total, dtype=total.dtype, device=total.device)
    return total / torch.where(n != 0, n, torch.ones_like(n))
