"""The seam between the training loop and a teacher engine: ``TeacherScorer``.

A run picks its scorer once, when the session is built (``esr.train.session``):

    LocalScorer     the teacher loaded here, same tokenizer: exact, full vocabulary, chunked   (esr.teacher.score)
    CrossScorer     the teacher loaded here, another tokenizer: re-render, align, then aligned-exact or span-sampled
                                                                                               (esr.teacher.cross_score)
    RemoteScorer    a teacher server (``teacher.url``): log p_t of the sampled tokens, and the top-k for
                    ``loss.kind=topk``                                                       (esr.train.remote_teacher)
    VLLMScorer      the teacher in an in-process vLLM engine (``teacher.engine=vllm``): ``prompt_logprobs``,
                    log p_t of the sampled tokens and the top-k                              (esr.teacher.vllm_score)

Each step the loop asks it twice, without knowing which one it is:

    batch   = scorer.read(rollouts, prompt_index)           # TeacherBatch: what the teacher can score (valid_B_R)
    targets = scorer.targets(batch, micro_batch_size, ...)  # one TeacherTargets per micro-batch, in order

and the one micro-batch loss path (``esr.train.step.distill_micro_batch``) trains each micro-batch against its
targets (``esr.teacher.targets``). ``capabilities`` says what the loss may ask of it; ``check_supported`` turns a
config that asks more into a ``ConfigError`` before any step runs. A new engine is one more class with these two
methods, returning targets of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from esr.config import ConfigError, LossConfig
from esr.losses import needed_scores
from esr.teacher.cross import CrossBatch
from esr.teacher.targets import TeacherTargets
from esr.types import Rollouts

EXACT_KINDS = frozenset({"reverse_kl", "forward_kl", "jsd"})
"""Loss kinds that need the teacher's whole distribution at every trained position."""
ALL_KINDS = EXACT_KINDS | {"sampled", "topk"}
TOPK_KINDS = frozenset({"sampled", "topk"})
"""What a teacher that gives top-k and sampled-token log-probs (``TopKTargets``) can train."""
ALL_SCORES = frozenset({"kl", "hs", "ht"})


@dataclass(frozen=True)
class Capabilities:
    """What a teacher engine can give the loss."""

    loss_kinds: frozenset[str]
    """The ``loss.kind`` values it can train (exact divergences need full distributions; ``sampled`` needs only
    log p_t of the sampled token)."""
    scores: frozenset[str]
    """The per-token scores the score-based selectors may read with it (``esr.losses.needed_scores``: ``kl``
    KL(p_s || p_t), ``ht`` H(p_t), ``hs`` H(p_s)); ``kl`` and ``ht`` need the teacher's full distribution at the
    student's own positions (``TeacherTargets.teacher_logits``)."""
    where: str
    """How messages name this kind of teacher ("across tokenizers", "with a remote teacher (teacher.url)")."""


@dataclass(frozen=True)
class TeacherBatch:
    """One step's student rollouts as the teacher reads them."""

    rollouts: Rollouts
    """The student's rollouts (B rows, R response positions)."""
    teacher_rollouts: Rollouts
    """What the teacher's forward reads: the same rollouts, or re-rendered in the teacher's tokens."""
    valid_B_R: torch.Tensor
    """bool (B, R): the student's response tokens the teacher can score (the selection picks among them)."""
    seconds_align: float = 0.0
    """Wall seconds spent re-rendering and aligning (0 with one tokenizer)."""
    cross: CrossBatch | None = None
    """Across tokenizers: the alignment of the two tokenizations (``CrossScorer``'s)."""


@runtime_checkable
class TeacherScorer(Protocol):
    """A teacher engine, as the training loop sees it."""

    capabilities: Capabilities
    seconds: float
    """Wall seconds spent scoring since the loop last set it to 0 (reported as ``seconds_score``)."""

    def read(self, rollouts: Rollouts, prompt_index: Sequence[int]) -> TeacherBatch:
        """The step's ``rollouts`` (of the training prompts ``prompt_index``) as the teacher reads them."""
        ...

    def targets(self, batch: TeacherBatch, micro_batch_size: int,
                rows_per_pass: int | None = None) -> Iterable[TeacherTargets]:
        """The teacher's side of the loss for each training micro-batch of ``batch`` (rows [a, a +
        micro_batch_size), trimmed as ``Rollouts.slice`` trims them), in order. ``rows_per_pass``
        (``train.teacher_batch_size``) bounds the rows of one teacher forward where the engine batches them."""
        ...


def check_supported(cfg: LossConfig, capabilities: Capabilities) -> None:
    """Refuse a loss the teacher cannot feed, naming what can run instead."""
    if cfg.kind not in capabilities.loss_kinds:
        kinds = "|".join(sorted(capabilities.loss_kinds))
        raise ConfigError(f"loss.kind={cfg.kind} is not supported {capabilities.where}: use loss.kind={kinds}")
    if set(needed_scores(cfg.select)) - capabilities.scores:
        raise ConfigError(
            f"loss.select={cfg.select} ranks tokens by KL or entropy, which is not supported {capabilities.where} "
            "yet; use loss.select=all|first-n|last-n|middle-n|random-n"
        )
