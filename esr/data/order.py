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


def step_prompts(n_prompts: int, batch_size: int, step: int, seed: int, samples_per_prompt: int = 1) -> list[int]:
    """Prompt index of each of step ``step``'s ``batch_size`` rows: the step's batch_size / k prompts
    (``batch_indices``), each repeated k = ``samples_per_prompt`` times in a row, so prompt j of the step fills rows
    [j k, (j + 1) k). Each row is sampled with its own seed (its row id), so the k samples of a prompt differ."""
    return [i for i in batch_indices(n_prompts, batch_size // samples_per_prompt, step, seed)
            for _ in range(samples_per_prompt)]


@functools.lru_cache(maxsize=4)
def epoch_order(n_prompts: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n_prompts, generator=g).tolist())
