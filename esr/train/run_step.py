"""One optimizer step of the loop (``esr.train.loop``): plan the horizon, sample, score, loss and backward, update.

    metrics = run_step(session, cfg, step)   # 0-based step; returns the step's StepMetrics (1-based ``step``)

The loop around it logs, checkpoints, evaluates and stops; this module is what happens inside one step, in order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import torch

from esr.config import Config
from esr.losses import needed_scores
from esr.teacher.scorer import TeacherBatch
from esr.teacher.targets import TeacherTargets
from esr.train.distributed import clip_gradients, merge_metrics, my_rows, select_for_rows, sync_gradients
from esr.train.memory import release_freed_memory
from esr.train.metrics import StepMetrics, peak_memory_gb, step_flops
from esr.train.samples import sample_rows
from esr.train.scores import SELECT_SEED, Selection, TokenScores, score_tokens
from esr.train.session import Session, batch_indices
from esr.train.step import distill_micro_batch
from esr.types import Rollouts


def run_step(s: Session, cfg: Config, step: int, samples: list[dict[str, Any]] | None = None) -> StepMetrics:
    """One optimizer step: plan the horizon, sample, score, loss and backward, update. Returns its metrics; given a
    list ``samples``, also appends the samples table of this process's first ``log.samples`` rollouts to it."""
    # 1. Plan the horizon and sample the student's rollouts (seeded by step: a resumed run samples the same).
    horizon = s.policy.plan(step)
    rows, prompt_index, rollouts, seconds_generate = _sample(s, cfg, step, horizon)

    # 2. The rollouts as the teacher reads them (another tokenizer: re-rendered for it and aligned).
    batch = s.scorer.read(rollouts, prompt_index)

    # 3. Which response tokens get loss. Valid: every generated token (the horizon already stopped ESR at N), across
    #    tokenizers only those the alignment can pair. loss.select keeps some of them per rollout (all by default);
    #    the KL / entropy selectors first score every token in a no-grad pass (esr/train/scores.py), whose teacher
    #    targets the loss pass reuses. loss.position_gamma weighs the kept tokens by position.
    t0, s.scorer.seconds = time.perf_counter(), 0.0
    scores = (score_tokens(s.student, s.scorer, batch, cfg.loss, s.vocab_size, cfg.train.micro_batch_size,
                           cfg.train.teacher_batch_size) if needed_scores(cfg.loss.select) else None)
    selection = select_for_rows(cfg.loss, batch.valid_B_R, rollouts.response_mask_B_R,
                                SELECT_SEED + cfg.seed * 1_000_003 + step, scores, rows)  # n_total: whole batch
    seconds_select = time.perf_counter() - t0 - s.scorer.seconds  # the student's side of the scoring pass

    # 4. Teacher scoring (unless the scoring pass ran it) and the student's loss and backward, micro-batch by
    #    micro-batch.
    kl_rows: list[torch.Tensor] | None = [] if samples is not None else None
    loss, kl_sum, health = _loss_pass(s, cfg, batch, selection, scores, kl_rows)
    if samples is not None and kl_rows is not None:
        samples.extend(sample_rows(s.tokenizer, rollouts, torch.cat(kl_rows), selection.select_B_R.sum(1),
                                   cfg.log.samples))
    seconds_score = s.scorer.seconds + seconds_select
    seconds_train = time.perf_counter() - t0 - seconds_score

    # 5. Optimizer step, unless the loss or the gradient is not finite.
    grad_norm, skipped, lr = _optimizer_step(s, cfg, loss)

    lengths_B, n_selected = rollouts.lengths_B, int(selection.select_B_R.sum())
    flops_generate, flops_score, flops_train = _flops(s, batch, scores)
    return merge_metrics(StepMetrics(  # several processes: the whole batch's metrics, in every process
        step=step + 1, loss=loss, kl=kl_sum / max(1, n_selected), horizon=horizon,
        tokens_generated=int(lengths_B.sum()), tokens_scored=n_selected,
        trained_share=n_selected / max(1, int(lengths_B.sum())), response_len_mean=float(lengths_B.float().mean()),
        response_len_max=int(lengths_B.max()), cut_share=float(rollouts.cut_B.float().mean()),
        grad_norm=grad_norm, lr=lr, seconds_generate=seconds_generate, seconds_score=seconds_score,
        seconds_train=seconds_train, seconds_align=batch.seconds_align, peak_mem_gb=peak_memory_gb(s.device),
        flops_generate=flops_generate, flops_score=flops_score, flops_train=flops_train, skipped=skipped,
        engine_logp_delta_mean=health[0], engine_logp_delta_max=health[1],
    ))


def _sample(s: Session, cfg: Config, step: int, horizon: int) -> tuple[range, list[int], Rollouts, float]:
    """This process's rows of step ``step``'s batch, their prompts' indices, their rollouts and the seconds spent.

    Several processes: each takes its rows of the batch (distributed.py); a row's sample depends only on the seed,
    its index in the batch and its prompt, padded as the whole batch's longest prompt.
    """
    prompt_index = batch_indices(len(s.prompt_ids), cfg.train.batch_size, step, cfg.seed)
    pad_to = max(len(s.prompt_ids[i]) for i in prompt_index)
    rows = my_rows(len(prompt_index))
    prompt_index = [prompt_index[b] for b in rows]
    prompts = [s.prompt_ids[i] for i in prompt_index]
    t0 = time.perf_counter()
    s.sampler.sync_weights(s.student)  # an engine with its own copy of the weights takes the current ones
    rollouts = s.sampler.sample(prompts, horizon, seed=cfg.seed * 1_000_003 + step, row_ids=rows, pad_to=pad_to)
    seconds_generate = time.perf_counter() - t0
    release_freed_memory(s.device)  # CPU: hand freed heap pages back between phases (esr/train/memory.py)
    return rows, prompt_index, rollouts, seconds_generate


def _loss_pass(s: Session, cfg: Config, batch: TeacherBatch, selection: Selection, scores: TokenScores | None,
               kl_rows: list[torch.Tensor] | None = None) -> tuple[float, float, tuple[float | None, float | None]]:
    """Loss and backward of every micro-batch of rows [a, a + train.micro_batch_size), against the teacher's
    targets: the scoring pass's when it ran the teacher, else the scorer's now (``train.teacher_batch_size`` rows
    per no-grad forward where the engine batches them). Returns (the batch's loss, its summed KL metric, and the
    on-policy health: mean and max |log p_trainer - log p_engine|, None without engine log-probs). Given
    ``kl_rows``, appends each micro-batch's per-row KL sums ``kl_B`` to it (the samples table)."""
    mbs, rollouts = cfg.train.micro_batch_size, batch.rollouts
    teacher: Iterable[TeacherTargets] = (scores.teacher if scores is not None and scores.teacher is not None
                                         else s.scorer.targets(batch, mbs, cfg.train.teacher_batch_size))
    loss, kl_sum, delta_sum, delta_max, n_delta = 0.0, 0.0, 0.0, 0.0, 0
    for a, targets in zip(range(0, len(rollouts), mbs), teacher, strict=True):
        mb = rollouts.slice(a, a + mbs)
        n_resp = mb.response_mask_B_R.shape[1]
        weight_B_R = None if selection.weight_B_R is None else selection.weight_B_R[a : a + mbs, :n_resp]
        out = distill_micro_batch(s.student, targets, mb, selection.select_B_R[a : a + mbs, :n_resp],
                                  selection.n_total, cfg.loss, s.vocab_size, weight_B_R=weight_B_R)
        release_freed_memory(s.device)
        loss, kl_sum = loss + out.loss, kl_sum + out.kl_sum
        if kl_rows is not None:
            kl_rows.append(out.kl_B_R.sum(dim=1))
        delta_sum, delta_max, n_delta = (delta_sum + out.engine_delta_sum, max(delta_max, out.engine_delta_max),
                                         n_delta + out.engine_tokens)
    health = (delta_sum / n_delta, delta_max) if rollouts.logprobs_B_R is not None and n_delta else (None, None)
    return loss, kl_sum, health


def _optimizer_step(s: Session, cfg: Config, loss: float) -> tuple[float, bool, float]:
    """Clip and apply the accumulated gradients unless the loss or the gradient norm is not finite; advance the
    schedule. Several processes: their gradients are summed first (each is its rows' share of the batch mean).
    Returns (grad_norm, skipped, the learning rate used)."""
    trainable = [p for p in s.student.parameters() if p.requires_grad]
    finite = sync_gradients(trainable, math.isfinite(loss))
    grad_norm = clip_gradients(trainable, cfg.train.max_grad_norm or math.inf)
    skipped = not (finite and math.isfinite(grad_norm))
    if not skipped:
        s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    release_freed_memory(s.device)
    lr = s.scheduler.get_last_lr()[0]
    s.scheduler.step()
    return grad_norm, skipped, lr




def _flops(s: Session, batch: TeacherBatch, scores: TokenScores | None) -> tuple[float, ...]:
    """(flops_generate, flops_score, flops_train) of a step (``esr.train.metrics.step_flops``): each model's forward
    reads every real prompt + response token of its own tokenization once."""
    rollouts = batch.rollouts
    return step_flops(
        s.info["student_params"], s.info["teacher_params"], tokens_generated=int(rollouts.lengths_B.sum()),
        teacher_tokens=int(batch.teacher_rollouts.attention_mask_B_L.sum()),
        student_tokens=int(rollouts.attention_mask_B_L.sum()),
        selection_tokens=0 if scores is None else scores.student_tokens,
    )
