"""What a teacher gives the loss of one micro-batch: its side of the divergence, a time-chunk at a time.

A ``TeacherScorer`` (``esr.teacher.scorer``) turns a step's rollouts into one ``TeacherTargets`` per training
micro-batch; the one micro-batch loss path (``esr.train.step.distill_micro_batch``) projects the student's hidden
states a chunk of positions [a, b) at a time to ``student_logits_B_T_V`` and asks the targets for the per-token loss
and KL of that chunk. The loss path never asks which teacher it talks to; what differs between teachers is here:

- ``ExactTargets``: teacher hidden states at the student's response positions, projected by the teacher's head
  chunk by chunk (local teacher, same tokenizer; across tokenizers ``aligned-exact``, restricted to the shared
  vocabulary). Every ``loss.kind`` runs: the exact divergences, ``sampled`` and ``topk`` from the teacher's logits.
- ``TokenLogprobTargets``: log p_t(y) of each sampled student token, (B, R) (a teacher server asked for no top-k).
  Only ``loss.kind=sampled`` runs.
- ``TopKTargets``: log p_t(y) of each sampled token and the teacher's top-k ids and log-probs, (B, R, K) (an
  in-process vLLM teacher's ``prompt_logprobs``, a teacher server asked for top-k). ``loss.kind=topk|sampled``.
- ``SpanTargets``: across tokenizers ``span-sampled``: the teacher's log-probs of its own tokens and the groups
  pairing them with the student's; the advantage is the span's (a span may straddle chunks, so it is computed once
  per micro-batch in ``begin``).

A new engine adds a targets class here, not a branch in the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from esr.config import LossConfig
from esr.losses import (
    DIVERGENCES,
    jsd,
    reverse_kl,
    sampled_advantage,
    sampled_pg_loss,
    token_logprobs,
    topk_reverse_kl,
)
from esr.teacher.vocab_map import VocabMap

Project = Callable[[torch.Tensor], torch.Tensor]
"""A model's head: hidden states (B, T, H) -> float32 logits (B, T, V)."""


class TeacherTargets(Protocol):
    """The teacher's side of one micro-batch's loss (b rows, R student response positions)."""

    trainable_B_R: torch.Tensor | None
    """bool (b, R): the student positions this teacher can score (ANDed into the selection); None: all of them."""

    def begin(self, student_logprobs: Callable[[], torch.Tensor]) -> None:
        """Called once before the chunks; ``student_logprobs()`` gives log p_s(y) of every sampled token, (b, R),
        without grad. Targets whose loss needs the whole micro-batch at once (span-sampled) call it."""
        ...

    def loss_terms(self, cfg: LossConfig, student_logits_B_T_V: torch.Tensor, tokens_B_T: torch.Tensor,
                   a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss_B_T, kl_B_T) at response positions [a, b): the training loss per position for ``cfg.kind`` (with
        grad through ``student_logits_B_T_V``) and the KL metric per position (no grad)."""
        ...

    def teacher_logits(self, a: int, b: int) -> torch.Tensor:
        """float32 teacher logits (b, b - a, V) at the student's positions [a, b), for the score-based selectors;
        only teachers whose ``Capabilities.scores`` hold ``kl`` or ``ht`` give them."""
        ...


def per_token_loss(
    cfg: LossConfig, student_logits_B_T_V: torch.Tensor, teacher_logits_B_T_V: torch.Tensor, tokens_B_T: torch.Tensor
) -> torch.Tensor:
    """The training loss at each position, (B, T), for ``loss.kind`` from both models' logits.

    ``sampled``: -A * log p_s(y) with A = log p_t(y) - log p_s(y) detached (``esr.losses.sampled``); ``jsd`` with
    ``cfg.beta``; ``topk``: reverse KL over the teacher's top ``cfg.top_k`` tokens plus the tail (``esr.losses.topk``,
    the teacher's log-probs normalised over its V columns); else the exact divergence ``DIVERGENCES[cfg.kind]``.
    """
    if cfg.kind == "topk":
        k = min(cfg.top_k, teacher_logits_B_T_V.shape[-1])
        top = torch.log_softmax(teacher_logits_B_T_V.float(), dim=-1).topk(k, dim=-1)
        return topk_reverse_kl(student_logits_B_T_V, top.indices, top.values)
    if cfg.kind == "sampled":
        student_logp_B_T = token_logprobs(student_logits_B_T_V, tokens_B_T)
        teacher_logp_B_T = token_logprobs(teacher_logits_B_T_V, tokens_B_T)
        return sampled_pg_loss(student_logp_B_T, sampled_advantage(teacher_logp_B_T, student_logp_B_T))
    if cfg.kind == "jsd":
        return jsd(student_logits_B_T_V, teacher_logits_B_T_V, cfg.beta)
    return DIVERGENCES[cfg.kind](student_logits_B_T_V, teacher_logits_B_T_V)


@torch.no_grad()
def chunked_token_logprobs(project: Project, hidden_B_T_H: torch.Tensor, tokens_B_T: torch.Tensor,
                           chunk: int) -> torch.Tensor:
    """log p(tokens) (B, T) float32 from hidden states, projected ``chunk`` positions at a time, without grad."""
    out = [token_logprobs(project(hidden_B_T_H[:, a : a + chunk]), tokens_B_T[:, a : a + chunk])
           for a in range(0, tokens_B_T.shape[1], chunk)]
    return torch.cat(out, dim=1) if out else tokens_B_T.new_zeros(tokens_B_T.shape, dtype=torch.float32)


@dataclass
class ExactTargets:
    """The teacher's full distribution at every student position: hidden states, projected by ``head`` per chunk.

    With ``vocab_map`` (across tokenizers) both logits are restricted to the shared columns, and log_softmax inside
    the divergences renormalises over them:  p(v) / sum_{shared} p,  v shared.
    """

    hidden_B_R_H: torch.Tensor
    """Teacher hidden states predicting each student response token (b, R, H)."""
    head: Project
    """The teacher's head (``LocalScorer.logits``: counts its seconds)."""
    vocab_map: VocabMap | None = None
    trainable_B_R: torch.Tensor | None = None

    def begin(self, student_logprobs: Callable[[], torch.Tensor]) -> None:
        """Nothing to prepare: every chunk is self-contained."""

    def teacher_logits(self, a: int, b: int) -> torch.Tensor:
        return self.head(self.hidden_B_R_H[:, a:b])

    def loss_terms(self, cfg: LossConfig, student_logits_B_T_V: torch.Tensor, tokens_B_T: torch.Tensor,
                   a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_token_loss`` and the exact KL(p_s || p_t) per position (the loss itself when it is reverse KL; with
        ``loss.kind=topk`` still the full-vocabulary KL, which the top-k loss lower-bounds)."""
        teacher_logits_B_T_V = self.teacher_logits(a, b)
        if self.vocab_map is not None:
            student_logits_B_T_V, teacher_logits_B_T_V = self.vocab_map.restrict(student_logits_B_T_V,
                                                                                 teacher_logits_B_T_V)
        loss_B_T = per_token_loss(cfg, student_logits_B_T_V, teacher_logits_B_T_V, tokens_B_T)
        with torch.no_grad():
            kl_B_T = loss_B_T if cfg.kind == "reverse_kl" else reverse_kl(student_logits_B_T_V, teacher_logits_B_T_V)
        return loss_B_T, kl_B_T.detach()


@dataclass
class TokenLogprobTargets:
    """log p_t(y) of each sampled student token: what a teacher server returns. ``loss.kind=sampled`` only:

        A[b,t] = log p_t(y) - log p_s(y)   (detached)        loss[b,t] = -A[b,t] * log p_s(y)

    The KL metric is the single-sample estimate k = log p_s(y) - log p_t(y), E_{y ~ p_s}[k] = KL(p_s || p_t):
    unbiased for untempered sampling, noisy per token, able to go below 0.
    """

    teacher_logp_B_R: torch.Tensor
    """float (b, R): log p_t of response token r of each row (0 past its end); moved to the student's device and
    dtype a chunk at a time."""
    trainable_B_R: torch.Tensor | None = None

    def begin(self, student_logprobs: Callable[[], torch.Tensor]) -> None:
        """Nothing to prepare: the advantage is per token."""

    def teacher_logits(self, a: int, b: int) -> torch.Tensor:
        raise ValueError("this teacher gives sampled-token log-probs only, not logits")

    def loss_terms(self, cfg: LossConfig, student_logits_B_T_V: torch.Tensor, tokens_B_T: torch.Tensor,
                   a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        if cfg.kind != "sampled":
            raise ValueError(f"a remote teacher gives sampled-token log-probs only: loss.kind must be sampled, "
                             f"not {cfg.kind}")
        student_logp_B_T = token_logprobs(student_logits_B_T_V, tokens_B_T)
        teacher_logp_B_T = self.teacher_logp_B_R[:, a:b].to(student_logp_B_T.device, student_logp_B_T.dtype)
        loss_B_T = sampled_pg_loss(student_logp_B_T, sampled_advantage(teacher_logp_B_T, student_logp_B_T))
        return loss_B_T, student_logp_B_T.detach() - teacher_logp_B_T


@dataclass
class TopKTargets:
    """What a top-k teacher engine gives (an in-process vLLM teacher's ``prompt_logprobs``, a server asked for
    top-k): log p_t(y) of each sampled student token and the teacher's k most likely tokens with their log-probs,
    all normalised over the teacher's whole vocabulary. Two loss kinds run:

    - ``topk``: reverse KL over the top-k buckets plus the tail (``esr.losses.topk``); the KL metric is that same
      top-k + tail KL (exact for the (k+1)-bucket distributions, a lower bound of the full-vocabulary KL).
    - ``sampled``: the sampled estimator, as ``TokenLogprobTargets`` (log p_t(y) is exact: vLLM's prompt log-probs
      always include the scored token, whatever its rank).
    """

    teacher_logp_B_R: torch.Tensor
    """float (b, R): log p_t of response token r of each row (0 past its end)."""
    top_ids_B_R_K: torch.Tensor
    """int64 (b, R, K): the teacher's top-k ids in the student's columns (``esr.losses.mask_top_columns``: ids the
    student lacks are id 0 with log-prob -inf, no bucket)."""
    top_logp_B_R_K: torch.Tensor
    """float (b, R, K): their log-probs (-inf: not a bucket)."""
    trainable_B_R: torch.Tensor | None = None

    def begin(self, student_logprobs: Callable[[], torch.Tensor]) -> None:
        """Nothing to prepare: both losses are per token."""

    def teacher_logits(self, a: int, b: int) -> torch.Tensor:
        raise ValueError("this teacher gives top-k log-probs only, not logits")

    def loss_terms(self, cfg: LossConfig, student_logits_B_T_V: torch.Tensor, tokens_B_T: torch.Tensor,
                   a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        if cfg.kind == "sampled":
            return TokenLogprobTargets(self.teacher_logp_B_R).loss_terms(cfg, student_logits_B_T_V, tokens_B_T, a, b)
        if cfg.kind != "topk":
            raise ValueError(f"a top-k teacher gives top-k and sampled-token log-probs only: loss.kind must be topk "
                             f"or sampled, not {cfg.kind}")
        device = student_logits_B_T_V.device
        loss_B_T = topk_reverse_kl(student_logits_B_T_V, self.top_ids_B_R_K[:, a:b].to(device),
                                   self.top_logp_B_R_K[:, a:b].to(device))
        return loss_B_T, loss_B_T.detach()


def group_sum(values_B_T: torch.Tensor, group_B_T: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(B, G) sums of ``values`` over the positions of each group; positions with group -1 are left out."""
    out_B_G = torch.zeros((values_B_T.shape[0], n_groups), dtype=values_B_T.dtype, device=values_B_T.device)
    keep_B_T = group_B_T >= 0
    return out_B_G.scatter_add(1, group_B_T.clamp(min=0), torch.where(keep_B_T, values_B_T, 0.0))


def span_advantage(
    student_logp_B_R: torch.Tensor,
    teacher_logp_B_Rt: torch.Tensor,
    group_B_R: torch.Tensor,
    group_B_Rt: torch.Tensor,
    n_groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each student token's span advantage A_g (``SpanTargets``), and the span's KL estimate -A_g spread evenly
    over its student tokens; both (B, R), 0 on tokens in no group."""
    kl_B_G = group_sum(student_logp_B_R, group_B_R, n_groups) - group_sum(teacher_logp_B_Rt, group_B_Rt, n_groups)
    size_B_G = group_sum(torch.ones_like(student_logp_B_R), group_B_R, n_groups).clamp(min=1)
    index_B_R, in_group_B_R = group_B_R.clamp(min=0), group_B_R >= 0
    advantage_B_R = torch.where(in_group_B_R, -kl_B_G.gather(1, index_B_R), 0.0)
    kl_B_R = torch.where(in_group_B_R, (kl_B_G / size_B_G).gather(1, index_B_R), 0.0)
    return advantage_B_R, kl_B_R


@dataclass
class SpanTargets:
    """``span-sampled`` across tokenizers: every group g (student tokens S_g, teacher tokens T_g, same text) is
    trained with the sampled estimator at span level,

        A_g = log p_T(text_g | context) - log p_S(text_g | context)
            = sum_{j in T_g} log p_T(t_j) - sum_{i in S_g} log p_S(s_i)
        loss_i = -A_g * log p_S(s_i)  for i in S_g          (A_g detached)

    so the gradient over a group is -A_g * grad log p_S(text_g), REINFORCE on the span with the teacher's span
    log-likelihood as the reward. With identical tokenizers every group is one token and this is the token-level
    ``sampled`` loss. The logged KL is the sampled estimate -A_g, spread evenly over the group's tokens. It is the
    loss for ``loss.kind`` ``sampled`` and ``reverse_kl`` alike (the estimator of reverse KL).
    """

    teacher_logp_B_Rt: torch.Tensor
    """log p_t of each teacher response token (b, Rt), on the student's device."""
    group_B_R: torch.Tensor
    """int64 (b, R): each student token's group, -1 outside every group (``CrossBatch``)."""
    group_B_Rt: torch.Tensor
    """int64 (b, Rt): each teacher token's group."""
    n_groups: int
    trainable_B_R: torch.Tensor | None = None
    advantage_B_R: torch.Tensor | None = field(default=None, init=False)
    kl_B_R: torch.Tensor | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.trainable_B_R = self.group_B_R >= 0

    def begin(self, student_logprobs: Callable[[], torch.Tensor]) -> None:
        """A_g and the KL estimate for the whole micro-batch, from a no-grad pass of the student's head."""
        self.advantage_B_R, self.kl_B_R = span_advantage(student_logprobs(), self.teacher_logp_B_Rt, self.group_B_R,
                                                         self.group_B_Rt, self.n_groups)

    def teacher_logits(self, a: int, b: int) -> torch.Tensor:
        raise ValueError("span-sampled compares whole spans; there are no teacher logits at the student's positions")

    def loss_terms(self, cfg: LossConfig, student_logits_B_T_V: torch.Tensor, tokens_B_T: torch.Tensor,
                   a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.advantage_B_R is not None and self.kl_B_R is not None, "begin() first"
        logp_B_T = token_logprobs(student_logits_B_T_V, tokens_B_T)
        return sampled_pg_loss(logp_B_T, self.advantage_B_R[:, a:b]), self.kl_B_R[:, a:b]
