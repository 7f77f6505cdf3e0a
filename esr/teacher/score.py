"""The local teacher, same tokenizer (``LocalScorer``): a no-grad pass over the student's prompt + response.

Only the decoder body runs here, keeping the hidden states that predict response tokens (B x R x H). The loss
projects them to the vocabulary a time-chunk at a time (``logits``), so the teacher's B x R x V logits never exist
in full. The teacher is scored at temperature 1: the divergence compares untempered distributions, whatever
temperature the student sampled at.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from esr.models.forward import head_logits, response_hidden
from esr.teacher.scorer import ALL_KINDS, ALL_SCORES, Capabilities, TeacherBatch
from esr.teacher.targets import ExactTargets
from esr.types import Rollouts


class LocalScorer:
    """A ``TeacherScorer`` over a frozen teacher loaded in this process that shares the student's token ids;
    tracks the seconds it spends (body and head). Gives ``ExactTargets``: every loss kind and selector runs."""

    capabilities = Capabilities(loss_kinds=ALL_KINDS, scores=ALL_SCORES, where="with this teacher")

    def __init__(self, model: nn.Module, *, vocab_size: int) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.vocab_size = vocab_size
        """V: the logit columns the teacher is normalised over (those both models define)."""
        self.seconds = 0.0

    def read(self, rollouts: Rollouts, prompt_index: Sequence[int]) -> TeacherBatch:
        """The teacher reads the student's own tokens: every response token can be scored."""
        return TeacherBatch(rollouts=rollouts, teacher_rollouts=rollouts, valid_B_R=rollouts.response_mask_B_R)

    def targets(self, batch: TeacherBatch, micro_batch_size: int,
                rows_per_pass: int | None = None) -> list[ExactTargets]:
        """Each micro-batch's teacher hidden states (``score_micro_batches``: ``rows_per_pass`` rows per forward),
        projected by ``logits`` a chunk at a time when the loss asks."""
        hidden = self.score_micro_batches(batch.rollouts, micro_batch_size, rows_per_pass)
        return [ExactTargets(hidden_B_R_H=h, head=self.logits) for h in hidden]

    @torch.no_grad()
    def score(self, rollouts: Rollouts) -> torch.Tensor:
        """Teacher hidden states at response-predicting positions, (B, R, H), for rows of ``rollouts``."""
        t0 = time.perf_counter()
        hidden = response_hidden(self.model, rollouts)
        _finish(hidden)
        self.seconds += time.perf_counter() - t0
        return hidden

    @torch.no_grad()
    def score_micro_batches(self, rollouts: Rollouts, micro_batch_size: int,
                            rows_per_pass: int | None = None) -> list[torch.Tensor]:
        """Teacher hidden states for each training micro-batch of ``rollouts`` (rows [a, a + micro_batch_size), as
        ``Rollouts.slice`` trims them: (b, R_mb, H) each), computed ``rows_per_pass`` rows per forward (None: all
        rows at once; rounded down to whole micro-batches, at least one).

        A no-grad forward keeps one layer's activations at a time, so scoring several micro-batches at once costs
        little memory, and on a CPU a 4-row pass of the quickstart teacher is 3-8% faster than four 1-row passes
        (wider matrix products), left padding included (BENCHMARKS.md, ``benchmarks/teacher_pass.py``). Response
        column r is response token r in every row, so a micro-batch's states are its rows and its first R_mb
        columns of the pass's.
        """
        rows = len(rollouts)
        per_pass = rows if rows_per_pass is None else rows_per_pass
        per_pass = max(micro_batch_size, per_pass - per_pass % micro_batch_size)
        out = []
        for c in range(0, rows, per_pass):
            d = min(rows, c + per_pass)
            hidden_B_R_H = self.score(rollouts.slice(c, d))
            for a in range(c, d, micro_batch_size):
                n_resp = rollouts.slice(a, a + micro_batch_size).response_mask_B_R.shape[1]
                out.append(hidden_B_R_H[a - c : a - c + micro_batch_size, :n_resp])
        return out

    @torch.no_grad()
    def logits(self, hidden_B_T_H: torch.Tensor) -> torch.Tensor:
        """Teacher float32 logits (B, T, V) for a chunk of positions."""
        t0 = time.perf_counter()
        out = head_logits(self.model, hidden_B_T_H, self.vocab_size)
        _finish(out)
        self.seconds += time.perf_counter() - t0
        return out


def _finish(t: torch.Tensor) -> None:
    """On CUDA, wait for the kernels that made ``t``: the scorer's clock then bills the teacher's work to scoring,
    not to whatever synchronises next (the student's loss). A no-op on the CPU, where work is already done."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
