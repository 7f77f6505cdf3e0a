"""Which prompts each training step draws: a pure function of (step, seed), so a resumed run draws the same."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


def batch_indices(n_prompts: int, batch_size: int, step: int, seed: int) -> Sequence[int]:
    """Prompt indices of 0-based ``step``: consecutive slices of per-epoch permutations, a pure function of the step."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n_prompts)
        out.append(epoch_order(n_prompts, seed, epoch)[i])
    return out


@functools.lru_cache(maxsize=4)
def epoch_order(n_prompts: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n_prompts, generator=g).tolist())
