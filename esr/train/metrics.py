"""Per-step metrics: ``metrics.jsonl`` (one JSON object per step, flushed and fsynced), and the experiment trackers.

On resume the log is cut back to the checkpoint's step, so a crash between a step's log line and the next checkpoint
never leaves a duplicated or missing step.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from esr.config import Config
from esr.train.trackers import TensorBoardTracker, Tracker, numbers, open_trackers


@dataclass(frozen=True)
class StepMetrics:
    step: int
    """1-based number of completed optimizer steps."""
    loss: float
    """Training loss (token mean over selected tokens); NaN when the step was skipped."""
    kl: float
    """Mean exact reverse KL(p_s || p_t) per selected token, whatever the training loss. Across tokenizers:
    over the shared vocabulary (aligned-exact) or the sampled span estimate per token (span-sampled). With a remote
    teacher (``teacher.url``), which gives log p_t of the sampled tokens only: the sampled estimate, the mean of
    log p_s(y) - log p_t(y) over selected tokens (unbiased, noisy, can be negative; esr/teacher/targets.py)."""
    horizon: int
    tokens_generated: int
    tokens_scored: int
    """Response tokens that got loss (the selected tokens)."""
    trained_share: float
    """tokens_scored / tokens_generated (below 1 across tokenizers: tokens the alignment could not pair)."""
    response_len_mean: float
    response_len_max: int
    cut_share: float
    """Share of rollouts that reached the horizon without EOS."""
    grad_norm: float
    lr: float
    seconds_generate: float
    seconds_score: float
    """Teacher forward and head; with a score-based ``loss.select`` also the student's no-grad selection forward."""
    seconds_train: float
    seconds_align: float
    """Cross-tokenizer re-rendering, re-encoding and alignment (0 with one tokenizer)."""
    peak_mem_gb: float
    """Peak resident memory of the process (CPU) or peak allocated CUDA memory, in GB."""
    flops_generate: float
    """Approximate sampling FLOPs, 2 * student_params * tokens_generated (``step_flops``)."""
    flops_score: float
    """Approximate scoring FLOPs: 2 * teacher_params * teacher prompt + response tokens, plus the student's no-grad
    selection forward for score-based ``loss.select`` (``step_flops``)."""
    flops_train: float
    """Approximate student forward + backward FLOPs, 6 * student_params * prompt + response tokens (``step_flops``).
    Run totals are the sums over metrics.jsonl lines."""
    skipped: bool = False
    seconds_extrapolate: float = 0.0
    """EffOPD extrapolation after this step's update (probe calls and jumps; 0 when none ran)."""
    flops_extrapolate: float = 0.0
    """Approximate FLOPs of the extrapolation's probe forwards, 2 * student_params * tokens read."""
    engine_logp_delta_mean: float | None = None
    """On-policy health, for a rollout engine with its own copy of the weights (vLLM): mean over the step's response
    tokens of |log p_trainer(y) - log p_engine(y)| (kernels, a bf16 engine, a stale adapter show here; esr/train/
    step.py). None when the engine samples with the trainer's own module (hf)."""
    engine_logp_delta_max: float | None = None
    """The largest of those |delta| in the step."""
    distinct_share: float | None = None
    """`rollout.samples_per_prompt` k > 1: mean over the step's prompts of (distinct responses among its k samples) /
    k (1: all differ; 1/k: all the same). None when k = 1."""
    teacher_sampled: int = 0
    """Sequences the teacher sampled (`rollout.teacher_share`); the others are the student's."""
    kl_teacher_sampled: float | None = None
    """The KL metric per selected token over the teacher-sampled sequences only (the student on the teacher's text,
    off-policy); `kl` is over all sequences. None without teacher-sampled sequences."""
    tokens_teacher_sampled: int = 0
    """Selected tokens of the teacher-sampled sequences (included in tokens_scored)."""
    repeated_4gram_share: float | None = None
    """Mean over the step's responses of the share of their token 4-grams that repeat an earlier one (a collapse
    guard signal, esr/train/guard.py)."""
    multi_box_share: float | None = None
    """Share of the step's responses with several \\boxed answers (a collapse guard signal)."""
    probe_kl: float | None = None
    """`rollout.horizon=auto`, on a step a probe preceded: the probe's mean reverse KL per scored token
    (esr/train/horizon_probe.py). None otherwise."""
    probe_seconds: float = 0.0
    """Wall time of the auto-horizon probe before this step (0 when none ran)."""
    probe_flops: float = 0.0
    """Approximate FLOPs of that probe: 2 * student_params * (sampled + read tokens) + 2 * teacher_params * tokens."""
    probe_share: float | None = None
    """`rollout.horizon=auto`: share of the run's wall time so far spent in probes (None for other horizons)."""
    by_source: dict[str, dict[str, float]] | None = None
    """With ``data.mix``: per source (its name), scored by its own teacher: ``kl`` (as ``kl``, over its rows),
    ``tokens_scored``, ``rows``, ``seconds_score`` (its teacher) and ``seconds`` (its scoring, loss and backward).
    None for one source. Several processes: rank 0's rows."""


def step_flops(
    student_params: int, teacher_params: int, *, tokens_generated: int, teacher_tokens: int, student_tokens: int,
    selection_tokens: int = 0,
) -> tuple[float, float, float]:
    """(flops_generate, flops_score, flops_train) of one step, by the 2N-per-token forward rule (N parameters).

        flops_generate = 2 * N_s * tokens_generated
        flops_score    = 2 * N_t * teacher_tokens + 2 * N_s * selection_tokens
        flops_train    = 6 * N_s * student_tokens              (forward 2N + backward 4N per token)

    ``teacher_tokens`` / ``student_tokens``: real (non-padding) prompt + response tokens of the sequences each
    model's forward reads (the teacher's own tokenization across tokenizers); ``selection_tokens``: those of the
    student's no-grad forward in a score-based selection pass (0 otherwise).

    Approximations: attention's context-length term (4 * layers * d_model * context per token) and padding are
    left out; generation counts one forward per generated token and leaves out the prompt's prefill; embedding
    parameters count like matmul weights; 6N assumes every weight gets a gradient, so under LoRA, where the frozen
    weights' gradients are skipped, flops_train overstates the backward by up to a third.
    """
    return (2.0 * student_params * tokens_generated,
            2.0 * teacher_params * teacher_tokens + 2.0 * student_params * selection_tokens,
            6.0 * student_params * student_tokens)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


class MetricsLog:
    """Appends StepMetrics to ``metrics.jsonl`` and the samples table to ``samples.jsonl``; fans both out, with the
    evaluations' numbers, to the experiment trackers of ``log.trackers`` (esr/train/trackers.py; without a config:
    TensorBoard when ``tensorboard`` and it is installed)."""

    def __init__(self, run_dir: Path, cfg: Config | None = None, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        if cfg is None:
            writer = _tensorboard_writer(run_dir / "tb") if tensorboard else None
            self.trackers: list[Tracker] = [] if writer is None else [TensorBoardTracker(writer)]
        else:
            self.trackers = open_trackers(cfg, run_dir)
        self.logged_through = 0
        """Steps up to this one reached the trackers before a resume: not logged to them again."""

    def truncate_after(self, step: int) -> None:
        """Keep only lines with step <= ``step`` (called on resume from that checkpoint); the trackers, which cannot
        forget a point, skip the steps they already have."""
        if self.path.exists():
            steps = [_line_step(line) for line in self.path.read_text().splitlines()]
            self.logged_through = max((s for s in steps if s != sys.maxsize), default=0)
        truncate_jsonl(self.path, step)
        truncate_jsonl(self.samples_path, step)

    def write(self, metrics: StepMetrics) -> None:
        append_jsonl(self.path, asdict(metrics))
        self.scalars("train", metrics.step, asdict(metrics))

    def scalars(self, prefix: str, step: int, values: dict[str, Any]) -> None:
        """Send the numbers of a step's row (the evaluation's, the extrapolation's) to the trackers as
        ``prefix/key``."""
        if step > self.logged_through:
            for tracker in self.trackers:
                tracker.log_metrics(step, numbers(prefix, values))

    def table(self, step: int, rows: list[dict[str, Any]]) -> None:
        """The samples table of a step: one line per row in samples.jsonl, one table per tracker."""
        for row in rows:
            append_jsonl(self.samples_path, {"step": step, **row})
        if rows and step > self.logged_through:
            for tracker in self.trackers:
                tracker.log_table(step, rows)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self, status: str = "finished") -> None:
        """Finish every tracker (``status``: finished, stopped or failed); one that fails to close does not keep
        the others open."""
        errors = []
        for tracker in self.trackers:
            try:
                tracker.close(status)
            except Exception as e:  # noqa: BLE001 - a tracker's own failure must not hide the run's
                errors.append(e)
        self.trackers = []
        if errors:
            logging.getLogger("esr.train").warning("closing an experiment tracker failed: %s", errors[0])


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line and fsync it, so a crash loses at most the line being written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep only the lines of a step log with ``step`` <= ``step`` (and drop a torn last line), atomically."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if _line_step(line) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return sys.maxsize  # a torn last line from a crash: drop it


def _tensorboard_writer(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: say once per run what is not written and how to get it
        logging.getLogger("esr.train").info(
            "TensorBoard is not installed: %s is not written (metrics.jsonl is). "
            "pip install 'esr-distill[tensorboard]'", folder)
        return None
    return SummaryWriter(str(folder))

