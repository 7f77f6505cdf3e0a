"""Who samples a step's rows, and what the step reports about them: ``rollout.samples_per_prompt`` (k samples of
each prompt) and ``rollout.teacher_share`` (a share of the rows sampled by the teacher, GKD's mixture).

    k samples of a prompt   esr.data.order.step_prompts repeats each of the step's batch_size / k prompts k times;
                            every row has its own row id, hence its own seed, so the k samples differ
    teacher rows            esr.rollout.mixed.teacher_rows draws them from (seed, step); sample_mixed samples them
                            with the teacher's module (TeacherSampler)

Metrics: ``distinct_share`` (k > 1), the mean over prompts of (distinct responses among its k samples) / k: 1 when
every sample differs, 1/k when all k are the same (a collapsed policy, or temperature 0). ``teacher_sampled``, the
rows the teacher sampled, and ``kl_teacher_sampled``, the KL metric over their selected tokens: it measures the
student on the teacher's own text (off-policy, like supervised KD), not on its own, so it is reported apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from esr.config import Config, ConfigError
from esr.rollout.mixed import TeacherSampler
from esr.types import Rollouts

TEACHER_ROWS_SEED = 7_919
"""Offsets the teacher-row draw's seed from the sampling seeds (esr.rollout.mixed.teacher_rows)."""


def teacher_rows_seed(cfg: Config, step: int) -> int:
    """The seed of step ``step``'s teacher-row draw: a function of the run's seed and the step alone."""
    return TEACHER_ROWS_SEED + cfg.seed * 1_000_003 + step


def make_teacher_sampler(cfg: Config, teacher: nn.Module | None, cross_mode: str | None, *,
                         eos_token_ids: Sequence[int], pad_token_id: int, vocab_size: int) -> TeacherSampler | None:
    """The sampler of the teacher's rows when ``rollout.teacher_share`` > 0 (else None): HF ``generate`` on the
    teacher module with the rollout settings. The config checks refused a teacher not loaded here; across tokenizers
    (``cross_mode`` set) the teacher's tokens would be no student tokens, which is refused here, before the prompts
    are read."""
    r = cfg.rollout
    if r.teacher_share == 0:
        return None
    if cross_mode is not None or teacher is None:
        raise ConfigError(f"rollout.teacher_share={r.teacher_share} trains on the teacher's sampled token ids, but "
                          f"teacher '{cfg.teacher.name}' does not share the student's tokenizer: pick a teacher of the "
                          "student's family, or set rollout.teacher_share=0")
    return TeacherSampler(teacher, vocab_size=vocab_size, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                          temperature=r.temperature, top_p=r.top_p, min_new_tokens=r.min_new_tokens,
                          batch_size=r.batch_size)


def distinct_share(rollouts: Rollouts, rows: Sequence[int], k: int) -> float | None:
    """Mean over prompts of (distinct responses among its samples) / (its samples), prompt j holding batch rows
    [j k, (j + 1) k) (``rows``: this process's rows of the batch, in ``rollouts``' order). None when k == 1."""
    if k == 1:
        return None
    groups: dict[int, list[tuple[int, ...]]] = {}
    for b, row in enumerate(rows):
        tokens = rollouts.response_ids_B_R[b][rollouts.response_mask_B_R[b]].tolist()
        groups.setdefault(row // k, []).append(tuple(tokens))
    return sum(len(set(g)) / len(g) for g in groups.values()) / max(1, len(groups))


def teacher_kl(kl_B: torch.Tensor, select_B_R: torch.Tensor, from_teacher: Sequence[bool]) -> tuple[float | None, int]:
    """(mean KL metric per selected token of the teacher-sampled rows, their selected tokens); (None, 0) without
    any. ``kl_B``: each row's summed KL metric over its selected tokens."""
    pick_B = torch.tensor(list(from_teacher), dtype=torch.bool)
    tokens = int(select_B_R[pick_B].sum()) if pick_B.any() else 0
    if not tokens:
        return None, 0
    return float(kl_B[pick_B].sum()) / tokens, tokens
