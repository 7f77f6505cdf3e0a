"""The local teacher when it has another tokenizer (``CrossScorer``): re-render, align, then score.

Each step ``read`` re-renders the student's rollouts in the teacher's template and tokens and aligns the two
tokenizations (``esr.teacher.cross``). Per micro-batch, ``targets`` runs the teacher on its own tokens and gives:

``aligned-exact`` (the paper's): only 1:1 groups whose two tokens are the same token are trained, with the exact
divergence over the shared vocabulary, renormalised. The teacher's hidden state at its partner position is moved to
the student's position (``score_aligned``), after which it is the same-tokenizer computation on the shared columns
(``ExactTargets`` with a ``VocabMap``).

``span-sampled``: every aligned group is trained with the span-level sampled estimator (``SpanTargets``), from the
teacher's log-probs of its own tokens.

The teacher runs once per micro-batch (``train.teacher_batch_size`` does not group passes here), right before that
micro-batch's loss, so one micro-batch's teacher states are alive at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from esr.teacher.cross import CrossBatch, CrossTokenizer
from esr.teacher.score import LocalScorer
from esr.teacher.scorer import EXACT_KINDS, Capabilities, TeacherBatch
from esr.teacher.targets import ExactTargets, SpanTargets, TeacherTargets, chunked_token_logprobs
from esr.teacher.vocab_map import VocabMap
from esr.types import Rollouts

CROSS_MODES = ("aligned-exact", "span-sampled")


class CrossScorer:
    """A ``TeacherScorer`` for a local teacher with another tokenizer (module docstring)."""

    def __init__(self, teacher: LocalScorer, cross: CrossTokenizer, mode: str, *, chunk_size: int) -> None:
        """
        Args:
            teacher: the teacher's own scorer (its vocabulary size is the teacher's output width).
            cross: the translator between the two tokenizations, with the teacher's ids of every training prompt.
            mode: ``loss.cross_tokenizer``: ``aligned-exact`` or ``span-sampled``.
            chunk_size: teacher positions per head projection when span-sampled reads log-probs.
        """
        if mode not in CROSS_MODES:
            raise ValueError(f"loss.cross_tokenizer={mode!r} is not one of {', '.join(CROSS_MODES)}")
        self.teacher, self.cross, self.mode, self.chunk_size = teacher, cross, mode, chunk_size
        # span-sampled estimates reverse KL whichever of its two names loss.kind gives it (esr/config/schema.py)
        kinds = EXACT_KINDS if mode == "aligned-exact" else frozenset({"reverse_kl", "sampled"})
        self.capabilities = Capabilities(loss_kinds=kinds, scores=frozenset(), where="across tokenizers")
        self._vocab_map: VocabMap | None = None

    @property
    def vocab_size(self) -> int:
        """The teacher's logit columns (its own vocabulary)."""
        return self.teacher.vocab_size

    @property
    def seconds(self) -> float:
        return self.teacher.seconds

    @seconds.setter
    def seconds(self, value: float) -> None:
        self.teacher.seconds = value

    def read(self, rollouts: Rollouts, prompt_index: Sequence[int]) -> TeacherBatch:
        """Re-render and align; ``valid_B_R`` keeps the tokens the mode can train (exact 1:1 pairs, or tokens in
        an aligned group)."""
        t0 = time.perf_counter()
        cross = self.cross.translate(rollouts, prompt_index)
        seconds = time.perf_counter() - t0
        can_train_B_R = cross.exact_B_R if self.mode == "aligned-exact" else cross.trainable_B_R
        return TeacherBatch(rollouts=rollouts, teacher_rollouts=cross.teacher,
                            valid_B_R=rollouts.response_mask_B_R & can_train_B_R, seconds_align=seconds, cross=cross)

    def targets(self, batch: TeacherBatch, micro_batch_size: int,
                rows_per_pass: int | None = None) -> Iterator[TeacherTargets]:
        """Per micro-batch, scored when the loss reaches it (module docstring)."""
        assert batch.cross is not None, "a CrossScorer's batch comes from its own read()"
        for a in range(0, len(batch.rollouts), micro_batch_size):
            n_resp = batch.rollouts.slice(a, a + micro_batch_size).response_mask_B_R.shape[1]
            mb_cross = batch.cross.slice(a, a + micro_batch_size, n_resp)
            yield self._aligned(mb_cross) if self.mode == "aligned-exact" else self._span(mb_cross)

    @torch.no_grad()
    def score_aligned(self, cross: CrossBatch) -> torch.Tensor:
        """The teacher's hidden states of ``cross.teacher``, moved to the student's positions (B, R, H); row r
        holds the state at the teacher position paired with student position r (``pair_B_R``; unpaired positions
        get position 0's, which no loss reads)."""
        hidden_B_Rt_H = self.teacher.score(cross.teacher)
        index_B_R = cross.pair_B_R.clamp(min=0).to(hidden_B_Rt_H.device)
        return hidden_B_Rt_H.gather(1, index_B_R.unsqueeze(-1).expand(-1, -1, hidden_B_Rt_H.shape[-1]))

    def _aligned(self, cross: CrossBatch) -> ExactTargets:
        hidden_B_R_H = self.score_aligned(cross)
        if self._vocab_map is None:
            self._vocab_map = self.cross.vocab_map.to(hidden_B_R_H.device)
        return ExactTargets(hidden_B_R_H=hidden_B_R_H, head=self.teacher.logits, vocab_map=self._vocab_map,
                            trainable_B_R=cross.exact_B_R.to(hidden_B_R_H.device))

    def _span(self, cross: CrossBatch) -> SpanTargets:
        hidden_B_Rt_H = self.teacher.score(cross.teacher)
        device = hidden_B_Rt_H.device
        teacher_logp_B_Rt = chunked_token_logprobs(self.teacher.logits, hidden_B_Rt_H,
                                                   cross.teacher.response_ids_B_R.to(device), self.chunk_size)
        return SpanTargets(teacher_logp_B_Rt=teacher_logp_B_Rt, group_B_R=cross.group_B_R.to(device),
                           group_B_Rt=cross.group_B_Rt.to(device), n_groups=cross.n_groups)
