"""The data that flows through one training step.

Shape suffixes used across esr:
    _B  batch (sequences)          _P  prompt positions (left-padded)     _R  response positions
    _L  whole sequence (P + R)     _V  vocabulary                         _H  hidden size
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rollouts:
    """Student samples for one batch of prompts.

    Prompts are left-padded to a common length P so that every response starts at column P. A response ends at its
    first EOS (which is kept and trained: the student must learn to stop) or where the horizon cut it; positions
    after that are padding and ``response_mask_B_R`` is False there. The mask is built from the position of the
    first EOS, never from ``token != pad``, so it stays correct when pad == eos.
    """

    input_ids_B_L: torch.Tensor
    """Prompt + response token ids, int64, shape (B, P + R)."""
    attention_mask_B_L: torch.Tensor
    """1 on real tokens (prompt and response, EOS included), 0 on padding."""
    response_mask_B_R: torch.Tensor
    """Bool (B, R): response tokens that exist (and may get loss)."""
    prompt_len: int
    """P: the padded prompt length; response token r sits at column P + r."""
    horizon: int
    """Max new tokens this batch was sampled with."""
    cut_B: torch.Tensor
    """Bool (B,): the rollout reached the horizon without EOS (a valid sample, no penalty)."""
    logprobs_B_R: torch.Tensor | None = None
    """float (B, R): the sampling engine's log-prob of each sampled response token, where the engine gives them
    (vLLM does; HF ``generate`` as esr runs it does not: None). The loss recomputes the trainer's own. NaN on rows
    the engine did not sample (the teacher's, ``rollout.teacher_share``: esr/rollout/mixed.py)."""

    @property
    def response_ids_B_R(self) -> torch.Tensor:
        return self.input_ids_B_L[:, self.prompt_len :]

    @property
    def lengths_B(self) -> torch.Tensor:
        return self.response_mask_B_R.sum(dim=1)

    @property
    def position_ids_B_L(self) -> torch.Tensor:
        """Positions that skip left padding, so a padded prompt sees the same positions as an unpadded one."""
        return (self.attention_mask_B_L.cumsum(dim=1) - 1).clamp(min=0)

    def __len__(self) -> int:
        return self.input_ids_B_L.shape[0]

    def slice(self, start: int, stop: int) -> Rollouts:
        """Rows [start, stop) as a micro-batch, trimmed of columns that are padding for every row."""
        ids, attn = self.input_ids_B_L[start:stop], self.attention_mask_B_L[start:stop]
        resp = self.response_mask_B_R[start:stop]
        # Drop prompt columns that are all left padding, and response columns past the longest response.
        first_real = int(attn[:, : self.prompt_len].any(dim=0).int().argmax()) if self.prompt_len else 0
        n_resp = int(resp.any(dim=0).nonzero().max()) + 1 if resp.any() else 0
        stop_col = self.prompt_len + n_resp
        return Rollouts(
            input_ids_B_L=ids[:, first_real:stop_col],
            attention_mask_B_L=attn[:, first_real:stop_col],
            response_mask_B_R=resp[:, :n_resp],
            prompt_len=self.prompt_len - first_real,
            horizon=self.horizon,
            cut_B=self.cut_B[start:stop],
            logprobs_B_R=None if self.logprobs_B_R is None else self.logprobs_B_R[start:stop, :n_resp],
        )
