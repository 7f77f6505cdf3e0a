"""THE training loop: plan horizon, sample, score, loss, step, log, checkpoint. Read it top to bottom; what happens
inside one step (horizon, sample, score, loss, update) is `run_step`, in esr/train/run_step.py.

    esr.train.train(load_config("configs/quickstart.yaml"))   ==   esr train configs/quickstart.yaml
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from esr.config import Config, save_config
from esr.errors import EsrError
from esr.optim import Extrapolator, make_extrapolator
from esr.train.checkpoint import (
    load_checkpoint,
    load_weights,
    remove_partial_checkpoints,
    save_checkpoint,
)
from esr.train.distributed import (
    NullLog,
    agree,
    barrier,
    is_main,
    join,
    largest,
    main_only,
)
from esr.train.engine_failure import explain_engine_failure
from esr.train.evaluation import PeriodicEval
from esr.train.extend import EXTENSIONS, extend_run, extensions, started_config
from esr.train.fsdp import full_optimizer_state, full_state_dict, shard_session
from esr.train.horizon_probe import HorizonProbe, horizon_state, make_horizon_probe, restore_horizon
from esr.train.metrics import MetricsLog, StepMetrics, append_jsonl
from esr.train.progress import RunProgress
from esr.train.rollback import Guard, GuardRollback, forget_after
from esr.train.run_folder import RunFolderError, check_new_run_folder
from esr.train.run_step import run_step
from esr.train.session import Session, build_session
from esr.train.stopping import RunStopped, StopRequests
from esr.train.trackers import check_trackers
from esr.train.verify import expected_of, resume_point


class NonFiniteLossError(EsrError, RuntimeError):
    """Several consecutive steps had a non-finite loss; the run stops rather than train on garbage."""


class StepOutOfMemoryError(EsrError, RuntimeError):
    """A training step ran out of memory; the message names the settings that lower a step's peak memory."""


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    steps: int
    metrics: list[dict[str, Any]]
    last_checkpoint: Path | None


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def resume(run_dir: str | Path, overrides: list[str] | None = None, *, progress: bool = True) -> RunResult:
    """Continue a stopped or finished run from its last complete checkpoint, with the config it was started with.
    ``overrides`` (``key=value``) may change only ``esr.train.extend.EXTENDABLE`` (``train.steps=N`` extends the run
    to N); they are written to the run's config.yaml and recorded in run.json."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunFolderError(f"{run_dir} is not a run folder (no config.yaml); nothing to resume")
    return train(extend_run(run_dir, list(overrides or [])), run_dir, resume=True, progress=progress)


def train(cfg: Config, run_dir: str | Path | None = None, *, resume: bool = False, progress: bool = True) -> RunResult:
    """Distil ``cfg.student`` from ``cfg.teacher`` for ``cfg.train.steps`` steps; return the run's metrics. The
    first Ctrl-C or SIGTERM during the steps ends the run after the current step, checkpointed, with ``RunStopped``
    (``esr.train.stopping``)."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    run_dir = join(cfg, run_dir)  # several processes (torchrun, accelerate): one group, rank 0's folder; else no-op
    if not resume:
        check_new_run_folder(cfg, run_dir)  # a file, a folder of other files, or another run: refused here
    if cfg.train.deterministic:
        _use_deterministic_algorithms()
    main_only(check_trackers, cfg)  # a tracker whose library is missing: said before any model loads
    s = build_session(cfg)  # before the folder exists: a config the session rejects leaves nothing behind
    barrier()  # every process has looked at the folder before rank 0, the only writer, writes into it
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        _write_run_json(run_dir, s.info)
    log = MetricsLog(run_dir, cfg) if is_main() else NullLog(run_dir)
    evals = PeriodicEval(cfg, run_dir)
    # EffOPD (optim.extrapolate): built from the initial weights, before a checkpoint replaces them; its probe
    # prompts are the ones chosen when the run started, also after an extension (esr/train/extend.py).
    extrapolator = (make_extrapolator(s, started_config(cfg, run_dir), run_dir) if cfg.optim.extrapolate.enabled
                    else None)
    events_path = run_dir / "extrapolate" / "events.jsonl"
    auto = make_horizon_probe(s, cfg, started_config(cfg, run_dir), run_dir)  # rollout.horizon=auto, else None

    status = "failed"  # how the trackers' run ends: finished, stopped (graceful stop; resumable) or failed
    try:
        s, start, ckpt, nonfinite_in_a_row = _restore(s, cfg, run_dir, resume, extrapolator, log, evals, events_path)
        guard = Guard(cfg, run_dir, s, extrapolator, log, evals, lambda step, folder, nonfinite: _checkpoint(
            s, cfg, folder, step, nonfinite, extrapolator, guard), ckpt)  # the collapse guard (esr/train/rollback.py)
        while True:
            try:
                ckpt = _steps(s, cfg, run_dir, start, ckpt, nonfinite_in_a_row, extrapolator, log, evals,
                              events_path, progress, guard, auto)
                break
            except GuardRollback as back:  # the guard restored an earlier checkpoint: go on after it
                start, ckpt, nonfinite_in_a_row = back.step, back.checkpoint, back.nonfinite_in_a_row
        status = "finished"
    except RunStopped:
        status = "stopped"
        raise
    finally:
        s.sampler.close()  # a vLLM engine holds memory and threads (a crash must not leave them behind)
        for scorer in [s.scorer] if s.route is None else s.route.all_scorers():
            getattr(scorer, "close", lambda: None)()  # so does an in-process vLLM teacher (teacher.engine=vllm)
        log.close(status)
    return RunResult(run_dir=run_dir, steps=cfg.train.steps, metrics=log.read(), last_checkpoint=ckpt)


def _steps(s: Session, cfg: Config, run_dir: Path, start: int, ckpt: Path | None, nonfinite_in_a_row: int,
           extrapolator: Extrapolator | None, log: MetricsLog, evals: PeriodicEval, events_path: Path,
           progress: bool, guard: Guard, auto: HorizonProbe | None = None) -> Path | None:
    """Steps ``start`` .. ``train.steps``: step, log, checkpoint, evaluate. Returns the last checkpoint. After the
    first Ctrl-C or SIGTERM, the step under way finishes (its extrapolation, log, checkpoint and evaluation too), is
    checkpointed if it was not, and ``RunStopped`` ends the run; a second signal stops at once."""
    bar = RunProgress(cfg.train.steps, start, enabled=progress and is_main())
    guard.start(start)  # policy rollback: the starting weights kept, so a trip has a checkpoint to go back to
    with StopRequests() as stop:  # the first SIGINT / SIGTERM sets stop.signum (esr/train/stopping.py)
        for step in range(start, cfg.train.steps):
            with (_explain_out_of_memory(cfg, step + 1, s.device, run_dir, bar),
                  explain_engine_failure(step + 1, run_dir, ckpt, bar)):
                samples = [] if cfg.log.samples_every and (step + 1) % cfg.log.samples_every == 0 else None
                probed = auto.probe(s, step) if auto is not None else {}  # rollout.horizon=auto: N picks itself
                metrics = run_step(s, cfg, step, samples)
                if auto is not None:
                    metrics = auto.record(metrics, probed)
                if extrapolator is not None and extrapolator.due(step + 1):
                    metrics = _extrapolate(extrapolator, s, step + 1, metrics, events_path, log, bar)
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if metrics.skipped else 0

            # Log, show, checkpoint.
            log.write(metrics)
            if samples:
                log.table(step + 1, samples)
            bar.update(metrics)
            guard.check_step(step + 1, bar)  # a trip logs an event; policy rollback raises GuardRollback
            if nonfinite_in_a_row >= cfg.train.max_nonfinite:
                bar.close()
                raise NonFiniteLossError(
                    f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (last at step "
                    f"{step + 1}); see {log.path}. Lower train.lr, check the teacher's logits, or raise "
                    "train.max_nonfinite.")
            # An evaluation step always gets a checkpoint, so the best one by eval.metric can be loaded.
            due = (step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == cfg.train.steps or evals.due(step + 1)
            if due:
                ckpt = _checkpoint(s, cfg, run_dir, step + 1, nonfinite_in_a_row, extrapolator, guard)
            if evals.due(step + 1):
                row = main_only(evals.run, step + 1, s.student, s.tokenizer, ckpt)
                log.scalars("eval", step + 1, row)
                bar.note(f"eval step {step + 1}: {cfg.eval.metric} {row[cfg.eval.metric]:.3f}")
                guard.check_eval(step + 1, bar)
            # A stop asked for during this step (in any process): checkpoint it if the cadence did not, and end here.
            signum = largest(stop.signum or 0)
            if signum and step + 1 < cfg.train.steps:
                if not due:
                    ckpt = _checkpoint(s, cfg, run_dir, step + 1, nonfinite_in_a_row, extrapolator, guard)
                bar.close()
                raise RunStopped(signum, step + 1, run_dir, ckpt)
    bar.close()
    return ckpt


def _checkpoint(s: Session, cfg: Config, run_dir: Path, step: int, nonfinite_in_a_row: int,
                extrapolator: Extrapolator | None, guard: Guard) -> Path:
    """Write the checkpoint of ``step`` (rank 0; with FSDP every process first gathers its shards)."""
    full = _gather_sharded(s, cfg) if cfg.train.fsdp else None  # every process takes part
    return main_only(save_checkpoint, run_dir, step, s.student, s.tokenizer, s.optimizer, s.scheduler, cfg,
                     {"nonfinite_in_a_row": nonfinite_in_a_row, "guard": guard.state(), **horizon_state(s.policy)},
                     extrapolator, full)


def _restore(s: Session, cfg: Config, run_dir: Path, resume: bool, extrapolator: Extrapolator | None,
             log: MetricsLog, evals: PeriodicEval, events_path: Path) -> tuple[Session, int, Path | None, int]:
    """Shard the models if asked and, on resume, load the newest intact checkpoint and forget what came after it.
    Returns (session, first step to run, that checkpoint, non-finite steps in a row).

    Before anything is loaded or sharded, rank 0 verifies the checkpoints newest first (``esr.train.verify``): a
    damaged one is renamed ``step-N.damaged-K`` with a warning, and every process loads the one rank 0 chose."""
    ckpt = None
    if resume:
        main_only(remove_partial_checkpoints, run_dir)
        expected = expected_of(s.student, s.optimizer, extrapolate=extrapolator is not None)
        ckpt = main_only(resume_point, run_dir, expected)
    if cfg.train.fsdp:  # the checkpoint's weights go in whole, then the layers are sharded (esr/train/fsdp.py)
        if ckpt is not None:
            load_weights(ckpt, s.student)
        s = shard_session(s, cfg)
        main_only(_write_run_json, run_dir, s.info)  # now with what each process holds
    if not resume:
        return s, 0, None, 0
    start, nonfinite_in_a_row = 0, 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, s.student, s.optimizer, s.scheduler, extrapolator, weights=not cfg.train.fsdp)
        start, nonfinite_in_a_row = state["step"], state["nonfinite_in_a_row"]
        restore_horizon(s.policy, state, ckpt)
    forget_after(run_dir, start, log, evals)  # events_path is run_dir/extrapolate/events.jsonl
    return s, start, ckpt, nonfinite_in_a_row


def _write_run_json(run_dir: Path, info: dict[str, Any]) -> None:
    """run.json: the session's facts, and the extensions recorded so far (esr/train/extend.py)."""
    recorded = extensions(run_dir)
    info = {**info, EXTENSIONS: recorded} if recorded else info
    tmp = run_dir / f".run.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, run_dir / "run.json")


def _gather_sharded(s: Session, cfg: Config) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """FSDP: the student's weights (LoRA: the adapter's) and the optimizer state, gathered whole for rank 0 to write
    in the one-process format. A collective (esr/train/fsdp.py)."""
    return (full_state_dict(s.student, trainable_only=cfg.train.finetune == "lora"),
            full_optimizer_state(s.optimizer))


def _use_deterministic_algorithms() -> None:
    """Bit-identical reruns on GPUs too: deterministic kernels (errors on ops that have none) and a fixed cuBLAS
    workspace. CPU runs are deterministic without this (same threads, same shapes)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


@contextmanager
def _explain_out_of_memory(cfg: Config, step: int, device: torch.device, run_dir: Path,
                           bar: RunProgress) -> Iterator[None]:
    """Turn an out-of-memory inside a step (CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's
    RuntimeError) into a StepOutOfMemoryError that names the settings lowering a step's peak."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        text = str(e).lower()
        if not (isinstance(e, MemoryError | torch.OutOfMemoryError) or "can't allocate memory" in text
                or "out of memory" in text):
            raise
        bar.close()
        r, t = cfg.rollout, cfg.train
        horizon = f"rollout.n={r.n}" if r.horizon == "esr" else f"rollout.max_new_tokens={r.max_new_tokens}"
        raise StepOutOfMemoryError(
            f"out of memory in step {step} on {device}. Lower what a step holds at once: train.micro_batch_size "
            f"(now {t.micro_batch_size}; the loss does not depend on it), loss.chunk_size (now "
            f"{cfg.loss.chunk_size}), rollout.batch_size (sequences generated together, now "
            f"{r.batch_size or 'the whole batch'}), the horizon ({horizon}), or set train.gradient_checkpointing=true"
            + (" or train.finetune=lora" if t.finetune == "full" else "")
            + f". Checkpoints already written are intact: continue with `esr train --resume {run_dir}`."
        ) from e


def _extrapolate(
    extrapolator: Extrapolator, s: Session, step: int, metrics: StepMetrics, events_path: Path, log: MetricsLog,
    bar: RunProgress,
) -> StepMetrics:
    """Run EffOPD's line search after step ``step``, log it to ``extrapolate/events.jsonl``; return the step's
    metrics with its seconds and FLOPs."""
    event = extrapolator.extrapolate(step)  # several processes: each on the same weights, so the same decision
    agree((event.tries, event.alphas_accepted, event.score_after), f"the extrapolation after step {step}")
    row = event.as_row()
    main_only(append_jsonl, events_path, row)
    log.scalars("extrapolate", step, {k: row[k] for k in ("score_before", "score_after", "tries", "accepted",
                                                         "seconds")})
    alphas = ", ".join(f"{a:.3g}" for a in event.alphas_accepted) or "none"
    bar.note(f"extrapolate step {step}: probe {event.score_before:.4f} -> {event.score_after:.4f}, "
             f"accepted alpha {alphas} of {event.tries} tries ({event.seconds:.1f}s)")
    return dataclasses.replace(metrics, seconds_extrapolate=event.seconds,
                               flops_extrapolate=2.0 * s.info["student_params"] * event.probe_tokens)
