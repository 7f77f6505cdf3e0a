"""A batch sampled by two models: the student's rows and the teacher's (``rollout.teacher_share``, GKD's mixture).

    rollouts = sample_mixed(student_sampler, teacher_sampler, prompts, from_teacher, horizon, seed=s, row_ids=rows)

Row b is sampled by the teacher where ``from_teacher[b]``, else by the student's engine; both key its noise by
``(seed, row_ids[b])`` (esr/rollout/sampler.py), so a row's tokens do not depend on which model sampled the others,
and a resumed run samples the same. The two parts are merged back into batch order (``merge_rollouts``): prompts
keep their common left padding, responses are right-padded to the longest.

The teacher samples with HF ``generate`` on its own module (``TeacherSampler``), at the run's temperature, top-p,
minimum length and horizon, stopping at the run's EOS ids; ids past the student's logit columns are never drawn.
An engine that returns log-probs (vLLM) gives none for teacher rows: their ``logprobs_B_R`` are NaN, which the
on-policy health metric and ``loss.tis_cap`` skip (esr/train/step.py), since those rows are no student samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from esr.rollout.sampler import HFSampler, RowSampling
from esr.types import Rollouts

if TYPE_CHECKING:
    from esr.rollout.engine import Sampler


class VocabularyCap(LogitsProcessor):
    """Logit columns from ``vocab_size`` on set to -inf: a teacher with more (padded) columns than the student
    never samples an id the student has no embedding for."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[-1] <= self.vocab_size:
            return scores
        return scores.index_fill(-1, torch.arange(self.vocab_size, scores.shape[-1], device=scores.device),
                                 float("-inf"))


class TeacherSampler(HFSampler):
    """``HFSampler`` over the (frozen) teacher module, capped to the student's ``vocab_size`` columns. Its weights
    never change, so ``sync_weights`` does nothing."""

    def __init__(self, teacher: torch.nn.Module, *, vocab_size: int, **kwargs: object) -> None:
        super().__init__(teacher, **kwargs)  # type: ignore[arg-type]
        self.vocab_size = vocab_size

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing: the teacher is not trained."""

    def generate_rows(self, ids_B_P: torch.Tensor, mask_B_P: torch.Tensor, rows: Sequence[int], seed: int,
                      gen_config: GenerationConfig) -> torch.Tensor:
        """``HFSampler.generate_rows`` with the vocabulary cap before the per-row draw."""
        device = next(self.model.parameters()).device
        processors = LogitsProcessorList([VocabularyCap(self.vocab_size)] + (
            [RowSampling(self.temperature, self.top_p, seed, rows)] if self.temperature > 0 else []))
        out_B_L = self.model.generate(input_ids=ids_B_P.to(device), attention_mask=mask_B_P.to(device),
                                      generation_config=gen_config, logits_processor=processors)
        return out_B_L[:, ids_B_P.shape[1] :].cpu()


def teacher_rows(batch_size: int, share: float, seed: int) -> list[bool]:
    """Which of a batch's rows the teacher samples: row b where u_b < ``share``, u_b the b-th uniform of a CPU
    generator seeded ``seed`` (a function of the run's seed and the step: every process and a resumed run draw the
    same rows). Each row is the teacher's with probability ``share``; 0 draws nothing, 1 takes every row."""
    if share <= 0:
        return [False] * batch_size
    u_B = torch.rand((batch_size,), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (u_B < share).tolist()


def sample_mixed(student: Sampler, teacher: Sampler | None, prompt_ids: Sequence[Sequence[int]],
                 from_teacher: Sequence[bool], max_new_tokens: int, *, seed: int, row_ids: Sequence[int],
                 pad_to: int, pad_token_id: int) -> Rollouts:
    """Row b of ``prompt_ids`` sampled by ``teacher`` where ``from_teacher[b]``, else by ``student``; the rows in
    their given order (module docstring). Without teacher rows this is ``student.sample`` itself."""
    if not any(from_teacher):
        return student.sample(prompt_ids, max_new_tokens, seed=seed, row_ids=row_ids, pad_to=pad_to)
    if teacher is None:
        raise ValueError("sample_mixed: rows for the teacher but no teacher sampler")
    parts = []
    for model, pick in ((student, False), (teacher, True)):
        pos = [b for b, t in enumerate(from_teacher) if t == pick]
        if pos:
            part = model.sample([prompt_ids[b] for b in pos], max_new_tokens, seed=seed,
                                row_ids=[row_ids[b] for b in pos], pad_to=pad_to)
            parts.append((pos, part, pick))
    return merge_rollouts([(pos, part) for pos, part, _ in parts], pad_token_id,
                          engine_logprobs=[not pick for _, _, pick in parts])


def merge_rollouts(parts: Sequence[tuple[Sequence[int], Rollouts]], pad_token_id: int,
                   engine_logprobs: Sequence[bool] | None = None) -> Rollouts:
    """One ``Rollouts`` whose rows ``pos`` are ``part``'s, for each (pos, part): prompts left-padded to the longest
    padded prompt, responses right-padded to the longest response. Log-probs: a part's own where it has them and
    ``engine_logprobs`` (default all True) allows, NaN on the rows of the others (None when no part has any)."""
    engine_logprobs = [True] * len(parts) if engine_logprobs is None else list(engine_logprobs)
    B = sum(len(pos) for pos, _ in parts)
    P = max(r.prompt_len for _, r in parts)
    R = max(r.response_mask_B_R.shape[1] for _, r in parts)
    ids_B_L = torch.full((B, P + R), pad_token_id, dtype=torch.long)
    attn_B_L = torch.zeros((B, P + R), dtype=torch.long)
    resp_B_R = torch.zeros((B, R), dtype=torch.bool)
    cut_B = torch.zeros((B,), dtype=torch.bool)
    with_logp = any(r.logprobs_B_R is not None and ok for (_, r), ok in zip(parts, engine_logprobs, strict=True))
    logp_B_R = torch.full((B, R), float("nan")) if with_logp else None
    for (pos, r), ok in zip(parts, engine_logprobs, strict=True):
        idx, off, n = torch.tensor(list(pos), dtype=torch.long), P - r.prompt_len, r.response_mask_B_R.shape[1]
        ids_B_L[idx, off : P + n] = r.input_ids_B_L
        attn_B_L[idx, off : P + n] = r.attention_mask_B_L
        resp_B_R[idx, :n] = r.response_mask_B_R
        cut_B[idx] = r.cut_B
        if logp_B_R is not None and ok and r.logprobs_B_R is not None:
            logp_B_R[idx] = torch.nn.functional.pad(r.logprobs_B_R.float(), (0, R - n))
    horizon = max(r.horizon for _, r in parts)
    return Rollouts(input_ids_B_L=ids_B_L, attention_mask_B_L=attn_B_L, response_mask_B_R=resp_B_R, prompt_len=P,
                    horizon=horizon, cut_B=cut_B, logprobs_B_R=logp_B_R)
