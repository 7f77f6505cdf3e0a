"""One optimizer step of the loop (``esr.train.loop``): plan the horizon, sample, score, loss and backward, update.

    metrics = run_step(session, cfg, step)   # 0-based step; returns the step's StepMetrics (1-based ``step``)

The loop around it logs, checkpoints, evaluates and stops; this module is what happens inside one step, in order.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable
from typing import Any

import torch

from esr.config import Config
from esr.data.order import step_prompts
from esr.eval.math_answer import count_boxed, repeated_ngram_share
from esr.losses import needed_scores
from esr.rollout.mixed import sample_mixed, teacher_rows
from esr.teacher.scorer import TeacherBatch, TeacherScorer
from esr.teacher.targets import TeacherTargets
from esr.train.distributed import clip_gradients, merge_metrics, my_rows, select_for_rows, sync_gradients
from esr.train.memory import release_freed_memory
from esr.train.metrics import StepMetrics, peak_memory_gb, step_flops
from esr.train.sample_table import sample_rows
from esr.train.samples import distinct_share, teacher_kl, teacher_rows_seed
from esr.train.scores import SELECT_SEED, Selection, TokenScores, score_tokens
from esr.train.session import Session
from esr.train.step import distill_micro_batch
from esr.types import Rollouts


def run_step(s: Session, cfg: Config, step: int, samples: list[dict[str, Any]] | None = None) -> StepMetrics:
    """One optimizer step: plan the horizon, sample, score, loss and backward, update. Returns its metrics; given a
    list ``samples``, also appends the samples table of this process's first ``log.samples`` rollouts to it."""
    # 1. Plan the horizon and sample the student's rollouts (seeded by step: a resumed run samples the same).
    horizon = s.policy.plan(step)
    rows, prompt_index, rollouts, seconds_generate, from_teacher = _sample(s, cfg, step, horizon)

    if s.route is not None:  # data.mix: each source's rows read, scored and trained by its own teacher
        return run_mix_step(s, cfg, step, horizon, (rows, prompt_index, rollouts, seconds_generate))

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
    loss, kl_sum, kl_B, health = _loss_pass(s, cfg, batch, selection, scores)
    kl_teacher, tokens_teacher = teacher_kl(kl_B, selection.select_B_R, from_teacher)
    if samples is not None:  # log.samples_every: this step's table (esr/train/sample_table.py)
        samples.extend(sample_rows(s.tokenizer, rollouts, kl_B, selection.select_B_R.sum(1), cfg.log.samples))
    seconds_score = s.scorer.seconds + seconds_select
    seconds_train = time.perf_counter() - t0 - seconds_score

    # 5. Optimizer step, unless the loss or the gradient is not finite.
    grad_norm, skipped, lr = _optimizer_step(s, cfg, loss)

    n_selected = int(selection.select_B_R.sum())
    flops_generate, flops_score, flops_train = _flops(s, batch, scores)
    return merge_metrics(StepMetrics(  # several processes: the whole batch's metrics, in every process
        step=step + 1, loss=loss, kl=kl_sum / max(1, n_selected), horizon=horizon,
        **_rollout_metrics(rollouts, n_selected, s.tokenizer),
        grad_norm=grad_norm, lr=lr, seconds_generate=seconds_generate, seconds_score=seconds_score,
        seconds_train=seconds_train, seconds_align=batch.seconds_align, peak_mem_gb=peak_memory_gb(s.device),
        flops_generate=flops_generate, flops_score=flops_score, flops_train=flops_train, skipped=skipped,
        engine_logp_delta_mean=health[0], engine_logp_delta_max=health[1],
        distinct_share=distinct_share(rollouts, rows, cfg.rollout.samples_per_prompt),
        teacher_sampled=sum(from_teacher), kl_teacher_sampled=kl_teacher, tokens_teacher_sampled=tokens_teacher,
    ))



def _rollout_metrics(rollouts: Rollouts, n_selected: int, tokenizer: Any) -> dict[str, Any]:
    """The StepMetrics fields read off the step's rollouts and its ``n_selected`` selected tokens (one source or a
    mix alike), with the collapse guard's repetition signals (esr/train/guard.py): the mean repeated 4-gram share of
    the responses' token ids, and the share of responses with several ``\\boxed``."""
    lengths_B = rollouts.lengths_B
    responses = [ids[mask].tolist() for ids, mask in zip(rollouts.response_ids_B_R, rollouts.response_mask_B_R,
                                                         strict=True)]
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return {"tokens_generated": int(lengths_B.sum()), "tokens_scored": n_selected,
            "trained_share": n_selected / max(1, int(lengths_B.sum())),
            "response_len_mean": float(lengths_B.float().mean()), "response_len_max": int(lengths_B.max()),
            "cut_share": float(rollouts.cut_B.float().mean()),
            "repeated_4gram_share": sum(map(repeated_ngram_share, responses)) / max(1, len(responses)),
            "multi_box_share": sum(count_boxed(t) > 1 for t in texts) / max(1, len(texts))}

def _sample(s: Session, cfg: Config, step: int,
            horizon: int) -> tuple[range, list[int], Rollouts, float, list[bool]]:
    """This process's rows of step ``step``'s batch, their prompts' indices, their rollouts, the seconds spent and
    which of the rows the teacher sampled (``rollout.teacher_share``, esr/train/samples.py).

    Several processes: each takes its rows of the batch (distributed.py); a row's sample depends only on the seed,
    its index in the batch and its prompt, padded as the whole batch's longest prompt. ``rollout.samples_per_prompt``
    k: the step's batch_size / k prompts fill k consecutive rows each (esr.data.order.step_prompts).
    """
    prompt_index = _step_prompts(s, cfg, step)
    from_teacher = teacher_rows(len(prompt_index), cfg.rollout.teacher_share, teacher_rows_seed(cfg, step))
    pad_to = max(len(s.prompt_ids[i]) for i in prompt_index)
    rows = my_rows(len(prompt_index))
    prompt_index = [prompt_index[b] for b in rows]
    prompts, from_teacher = [s.prompt_ids[i] for i in prompt_index], [from_teacher[b] for b in rows]
    t0 = time.perf_counter()
    s.sampler.sync_weights(s.student)  # an engine with its own copy of the weights takes the current ones
    rollouts = sample_mixed(s.sampler, s.teacher_sampler, prompts, from_teacher, horizon,
                            seed=cfg.seed * 1_000_003 + step, row_ids=rows, pad_to=pad_to,
                            pad_token_id=s.tokenizer.pad_token_id)
    seconds_generate = time.perf_counter() - t0
    release_freed_memory(s.device)  # CPU: hand freed heap pages back between phases (esr/train/memory.py)
    return rows, prompt_index, rollouts, seconds_generate, from_teacher


def _step_prompts(s: Session, cfg: Config, step: int) -> list[int]:
    """The prompt index of each row of 0-based ``step``'s whole batch, a pure function of (step, seed): the step's
    batch_size / k prompts (the mix's rows, ``esr.data.mix``, or one source's, ``esr.data.order``), each repeated
    k = ``rollout.samples_per_prompt`` times in consecutive rows."""
    k = cfg.rollout.samples_per_prompt
    if s.route is not None:
        return [i for i in s.route.prompt_indices(cfg.train.batch_size // k, step, cfg.seed) for _ in range(k)]
    return step_prompts(len(s.prompt_ids), cfg.train.batch_size, step, cfg.seed, k)


def _loss_pass(s: Session, cfg: Config, batch: TeacherBatch, selection: Selection, scores: TokenScores | None,
              scorer: TeacherScorer | None = None,
              vocab_size: int | None = None) -> tuple[float, float, torch.Tensor, tuple[float | None, float | None]]:
    """Loss and backward of every micro-batch of rows [a, a + train.micro_batch_size), against the teacher's
    targets: the scoring pass's when it ran the teacher, else the scorer's now (``train.teacher_batch_size`` rows
    per no-grad forward where the engine batches them). Returns (the batch's loss, its summed KL metric, each
    row's summed KL metric (B,), and the on-policy health: mean and max |log p_trainer - log p_engine|, None without
    engine log-probs). ``scorer`` and ``vocab_size``: a mix source's (``run_mix_step``); default the session's."""
    mbs, rollouts = cfg.train.micro_batch_size, batch.rollouts
    scorer, vocab_size = scorer or s.scorer, vocab_size or s.vocab_size
    teacher: Iterable[TeacherTargets] = (scores.teacher if scores is not None and scores.teacher is not None
                                         else scorer.targets(batch, mbs, cfg.train.teacher_batch_size))
    loss, kl_sum, kl_rows, delta_sum, delta_max, n_delta = 0.0, 0.0, [], 0.0, 0.0, 0
    for a, targets in zip(range(0, len(rollouts), mbs), teacher, strict=True):
        mb = rollouts.slice(a, a + mbs)
        n_resp = mb.response_mask_B_R.shape[1]
        weight_B_R = None if selection.weight_B_R is None else selection.weight_B_R[a : a + mbs, :n_resp]
        out = distill_micro_batch(s.student, targets, mb, selection.select_B_R[a : a + mbs, :n_resp],
                                  selection.n_total, cfg.loss, vocab_size, weight_B_R=weight_B_R)
        release_freed_memory(s.device)
        loss, kl_sum = loss + out.loss, kl_sum + out.kl_sum
        kl_rows.append(out.kl_B_R.sum(dim=1))
        delta_sum, delta_max, n_delta = (delta_sum + out.engine_delta_sum, max(delta_max, out.engine_delta_max),
                                         n_delta + out.engine_tokens)
    health = (delta_sum / n_delta, delta_max) if rollouts.logprobs_B_R is not None and n_delta else (None, None)
    return loss, kl_sum, torch.cat(kl_rows) if kl_rows else torch.zeros(0), health


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


def _flops(s: Session, batch: TeacherBatch, scores: TokenScores | None,
           teacher_params: int | None = None) -> tuple[float, ...]:
    """(flops_generate, flops_score, flops_train) of a step (``esr.train.metrics.step_flops``): each model's forward
    reads every real prompt + response token of its own tokenization once. ``teacher_params``: a mix source's
    teacher's (default the session's teacher)."""
    rollouts = batch.rollouts
    return step_flops(
        s.info["student_params"], teacher_params or s.info["teacher_params"],
        tokens_generated=int(rollouts.lengths_B.sum()),
        teacher_tokens=int(batch.teacher_rollouts.attention_mask_B_L.sum()),
        student_tokens=int(rollouts.attention_mask_B_L.sum()),
        selection_tokens=0 if scores is None else scores.student_tokens,
    )


def run_mix_step(s: Session, cfg: Config, step: int, horizon: int,
                 sampled: tuple[range, list[int], Rollouts, float]) -> StepMetrics:
    """``run_step`` after sampling, for a data mix (``esr.train.route``): each source's rows are read, scored and
    trained by its own teacher, every loss divided by the whole batch's selected-token count. The selection is drawn
    once over the whole batch (score-based selectors are refused with a mix: esr/config/checks.py)."""
    assert s.route is not None
    rows, prompt_index, rollouts, seconds_generate = sampled
    t0 = time.perf_counter()
    groups = s.route.groups(prompt_index)
    for scorer in s.route.all_scorers():
        scorer.seconds = 0.0
    batches = [s.route.scorers[j].read(take_rows(rollouts, g), [prompt_index[b] for b in g]) for j, g in groups]
    valid_B_R = torch.zeros_like(rollouts.response_mask_B_R)
    for (_, g), batch in zip(groups, batches, strict=True):
        valid_B_R[g] = batch.valid_B_R.to(valid_B_R.device)
    selection = select_for_rows(cfg.loss, valid_B_R, rollouts.response_mask_B_R,
                                SELECT_SEED + cfg.seed * 1_000_003 + step, None, rows)
    loss, kl_sum, by_source, health_sums = 0.0, 0.0, {}, [0.0, 0.0, 0]
    for (j, g), batch in zip(groups, batches, strict=True):
        t_group, before = time.perf_counter(), s.route.scorers[j].seconds
        part = dataclasses.replace(selection, select_B_R=selection.select_B_R[g], scores=None,
                                   weight_B_R=None if selection.weight_B_R is None else selection.weight_B_R[g])
        group_loss, group_kl, _, health = _loss_pass(s, cfg, batch, part, None, s.route.scorers[j],
                                                     s.route.vocab_sizes[j])
        n = int(part.select_B_R.sum())
        loss, kl_sum = loss + group_loss, kl_sum + group_kl
        if health[0] is not None:
            tokens = int(batch.rollouts.lengths_B.sum())
            health_sums = [health_sums[0] + health[0] * tokens, max(health_sums[1], health[1] or 0.0),
                           health_sums[2] + tokens]
        by_source[s.route.mix.names[j]] = {
            "kl": group_kl / max(1, n), "tokens_scored": n, "rows": len(g),
            "seconds_score": s.route.scorers[j].seconds - before, "seconds": time.perf_counter() - t_group}
    seconds_score = sum(sc.seconds for sc in s.route.all_scorers())
    seconds_train = time.perf_counter() - t0 - seconds_score
    grad_norm, skipped, lr = _optimizer_step(s, cfg, loss)
    n_selected = int(selection.select_B_R.sum())
    flops = [sum(x) for x in zip(*(_flops(s, b, None, s.route.teacher_params[j]) for (j, _), b in
                                   zip(groups, batches, strict=True)), strict=True)]
    return merge_metrics(StepMetrics(
        step=step + 1, loss=loss, kl=kl_sum / max(1, n_selected), horizon=horizon,
        **_rollout_metrics(rollouts, n_selected, s.tokenizer),
        grad_norm=grad_norm, lr=lr, seconds_generate=seconds_generate, seconds_score=seconds_score,
        seconds_train=seconds_train, seconds_align=sum(b.seconds_align for b in batches),
        peak_mem_gb=peak_memory_gb(s.device), flops_generate=flops[0], flops_score=flops[1],
        flops_train=flops[2], skipped=skipped,
        engine_logp_delta_mean=health_sums[0] / health_sums[2] if health_sums[2] else None,
        engine_logp_delta_max=health_sums[1] if health_sums[2] else None, by_source=by_source,
        distinct_share=distinct_share(rollouts, rows, cfg.rollout.samples_per_prompt),
    ))


def take_rows(rollouts: Rollouts, rows: list[int]) -> Rollouts:
    """Rows ``rows`` of ``rollouts`` (in that order), columns untouched: a mix source's share of the batch."""
    idx = torch.tensor(rows, device=rollouts.input_ids_B_L.device)
    return dataclasses.replace(
        rollouts, input_ids_B_L=rollouts.input_ids_B_L[idx], attention_mask_B_L=rollouts.attention_mask_B_L[idx],
        response_mask_B_R=rollouts.response_mask_B_R[idx], cut_B=rollouts.cut_B[idx],
        logprobs_B_R=None if rollouts.logprobs_B_R is None else rollouts.logprobs_B_R[idx])
