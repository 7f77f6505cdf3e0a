"""Token selection for the loss (``loss.select``, ``loss.position_gamma``), with the no-grad scoring pass that the
score-based selectors need.

Which tokens get loss, and the loss's normaliser, must be known for the whole batch before the first micro-batch's
backward. So ``top-kl-n``, the entropy selectors and the products first score every token without grad, then
select, then the usual loss pass runs with the selected mask. The other selectors (``all``, ``first-n``, ``last-n``,
``middle-n``, ``random-n``) read only the mask and add no compute.

The scoring pass, per micro-batch (rows sliced exactly as the loss pass slices them):

- teacher: decoder body once, no grad, ``train.teacher_batch_size`` rows per forward -> hidden states (B, R, H).
  They are KEPT (in the teacher's ``TeacherTargets``) and handed to the loss pass, not recomputed: (B, R, H) is
  small next to logits (16 x 4096 x 3584 bf16 = 0.5 GB for a 7B teacher at R = 4096) and the teacher forward is
  most of the scoring cost. The loss pass then runs no teacher body at all.
- student: decoder body once, no grad; its hidden states are dropped after the micro-batch. The loss pass
  recomputes them with grad (keeping every micro-batch's graph alive until the selection is known would hold the
  activations of the whole batch at once).
- positions a chunk of ``loss.chunk_size`` at a time, as in ``esr.train.step``: B x c x V logits per model, reduced
  at once to KL(p_s || p_t), H(p_s), H(p_t) per token. B x R x V never exists.

Only what the selector needs is computed: ``top-teacher-entropy-n`` runs no student here, ``top-student-entropy-n``
no teacher (its teacher then runs in the loss pass as usual). Selection uses the exact reverse KL whatever
``loss.kind`` is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from esr.config import LossConfig
from esr.losses import entropy, needed_scores, position_weights, reverse_kl, select_tokens
from esr.models.forward import head_logits, response_hidden
from esr.teacher.scorer import TeacherBatch, TeacherScorer
from esr.teacher.targets import TeacherTargets

SELECT_SEED = 0x5E1EC7
"""Mixed into ``random-n``'s per-step seed so its stream differs from the sampler's."""


@dataclass
class TokenScores:
    """Per-token scores of a whole batch, (B, R) float32 on CPU (None when the selector does not need them)."""

    kl_B_R: torch.Tensor | None
    student_entropy_B_R: torch.Tensor | None
    teacher_entropy_B_R: torch.Tensor | None
    teacher: list[TeacherTargets] | None
    """The teacher's targets of each micro-batch, in order, for the loss pass (None: the teacher did not run here,
    the loss pass runs it)."""
    student_tokens: int
    """Prompt + response tokens the student's no-grad forward read (0 when it did not run): for ``flops_score``."""


@dataclass(frozen=True)
class Selection:
    """The tokens that get loss in one step and how the loss is normalised."""

    select_B_R: torch.Tensor
    """bool (B, R): the selected tokens."""
    weight_B_R: torch.Tensor | None
    """float (B, R) position weights, or None when ``loss.position_gamma`` is 0 (every token weighs 1)."""
    n_total: float
    """The loss's normaliser over the whole batch: selected tokens, or their summed weights (at least 1)."""
    scores: TokenScores | None
    """The scoring pass's output (score-based selectors only)."""


def select_for_step(
    cfg: LossConfig, valid_B_R: torch.Tensor, response_mask_B_R: torch.Tensor, seed: int,
    scores: TokenScores | None = None,
) -> Selection:
    """Apply ``loss.select`` among ``valid_B_R`` and ``loss.position_gamma``; ``seed`` drives ``random-n``.

        n_total = max(1, sum_{selected} w)      (w = 1 when gamma = 0: the count of selected tokens)
    """
    generator = torch.Generator().manual_seed(seed) if cfg.select == "random-n" else None
    score_kw = {} if scores is None else dict(
        kl_B_R=scores.kl_B_R, student_entropy_B_R=scores.student_entropy_B_R,
        teacher_entropy_B_R=scores.teacher_entropy_B_R)
    select_B_R = select_tokens(cfg.select, cfg.select_n, valid_B_R, generator=generator, **score_kw)
    if cfg.position_gamma == 0:
        return Selection(select_B_R, None, max(1, int(select_B_R.sum())), scores)
    weight_B_R = position_weights(response_mask_B_R, cfg.position_gamma)
    return Selection(select_B_R, weight_B_R, max(1.0, float(weight_B_R[select_B_R].sum())), scores)


@torch.no_grad()
def score_tokens(
    student: nn.Module, scorer: TeacherScorer, batch: TeacherBatch, cfg: LossConfig, vocab_size: int,
    micro_batch_size: int, teacher_batch_size: int | None = None,
) -> TokenScores:
    """The scoring pass (module docstring): per-token KL and entropies of the batch that ``cfg.select`` needs.
    The teacher's side comes from ``scorer.targets`` (``TeacherTargets.teacher_logits``: a scorer whose
    ``capabilities.scores`` hold ``kl`` and ``ht``)."""
    needs = set(needed_scores(cfg.select))
    run_student, run_teacher = bool(needs & {"kl", "hs"}), bool(needs & {"kl", "ht"})
    rollouts = batch.rollouts
    B, R = rollouts.response_mask_B_R.shape
    out = {key: torch.zeros((B, R), dtype=torch.float32) if key in needs else None for key in ("kl", "hs", "ht")}
    teacher = list(scorer.targets(batch, micro_batch_size, teacher_batch_size)) if run_teacher else None
    student_tokens = 0
    for i, a in enumerate(range(0, B, micro_batch_size)):
        mb = rollouts.slice(a, a + micro_batch_size)
        b, r = a + len(mb), mb.response_mask_B_R.shape[1]
        student_B_R_H = response_hidden(student, mb) if run_student else None
        student_tokens += int(mb.attention_mask_B_L.sum()) if run_student else 0
        for c in range(0, r, cfg.chunk_size):
            d = min(r, c + cfg.chunk_size)
            s_logits = head_logits(student, student_B_R_H[:, c:d], vocab_size) if run_student else None
            t_logits = teacher[i].teacher_logits(c, d) if teacher is not None else None
            for key in needs:
                value_B_T = reverse_kl(s_logits, t_logits) if key == "kl" else entropy(
                    s_logits if key == "hs" else t_logits)
                out[key][a:b, c:d] = value_B_T.float().cpu()
            del s_logits, t_logits
    return TokenScores(kl_B_R=out["kl"], student_entropy_B_R=out["hs"], teacher_entropy_B_R=out["ht"],
                       teacher=teacher, student_tokens=student_tokens)
