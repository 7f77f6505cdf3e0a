"""The ``train.guard`` section: the collapse guard (esr/train/guard.py detects, esr/train/rollback.py acts).

Every signal is compared with its own early baseline (the first ``baseline_steps`` logged steps, the first
``baseline_evals`` evaluations); the thresholds below were set on the committed real histories in
studies/results/ (tests/test_guard_detector.py replays them): they trip on the cross-family collapse at lr 2e-4 and
not on the healthy quickstart or cross-family lr 5e-5 runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from esr.config.ranges import NON_NEGATIVE, POSITIVE, PROBABILITY, Range, at_least, between, ranged

GuardPolicy = Literal["rollback", "warn", "off"]


@dataclass(frozen=True)
class GuardConfig:
    policy: GuardPolicy = "rollback"
    """`rollback` (default): on a trip, log it, restore the last checkpoint before it, multiply the learning rate by
    `lr_factor` and go on; `warn`: log it and warn only; `off`: no guard."""
    lr_factor: float = ranged(0.5, between(0, 1, lo_open=True, hi_open=True))
    """Learning-rate multiplier after each rollback (cumulative; kept in the checkpoints, so a resume keeps it)."""
    max_trips: int = ranged(3, at_least(1))
    """With `rollback`: the run stops (GuardStopError, checkpoints kept) at this trip instead of rolling back."""
    baseline_steps: int = ranged(4, at_least(1))
    """Logged steps forming each step signal's baseline (the first ones after the start or the last rollback to a
    step before them); no step signal is checked until they exist."""
    window: int = ranged(4, at_least(1))
    """Recent steps averaged for the share and length signals (one noisy step does not trip them)."""
    share_rise: float = ranged(0.3, PROBABILITY)
    """Step signals cut_share, repeated_4gram_share, multi_box_share: trip when the mean of the last `window` steps
    exceeds the baseline mean by this much (absolute)."""
    length_rise: float = ranged(0.5, POSITIVE)
    """Trip when the mean response length of the last `window` steps exceeds (1 + length_rise) x its baseline."""
    spike_z: float = ranged(10.0, POSITIVE)
    """Loss and grad-norm spikes: trip when a step's value exceeds the baseline median by spike_z robust standard
    deviations (1.4826 x MAD, at least 5% of the median) ..."""
    spike_ratio: float = ranged(4.0, Range(1))
    """... and is at least spike_ratio x the baseline median (both must hold)."""
    probe_kl_rise: float = ranged(0.5, POSITIVE)
    """Held-out probe KL (`probe_kl` of the auto horizon's probe steps): trip above (1 + rise) x its baseline median."""
    eval_at_start: bool = False
    """With eval.every > 0: also evaluate the starting weights (eval/step-000000) as the eval signals' baseline, as
    the studies do; else the baseline is the first evaluation during training (after eval.every steps)."""
    baseline_evals: int = ranged(1, at_least(1))
    """Evaluations forming the eval signals' baseline (eval.every > 0)."""
    eval_drop: float = ranged(0.3, PROBABILITY)
    """eval.metric: trip when it falls below its baseline by more than eval_drop x baseline and three binomial standard
    errors (so a metric at 0, or a change of a few answers, never trips it)."""
    eval_cut_rise: float = ranged(0.45, PROBABILITY)
    """Evaluation answers cut at eval.max_new_tokens: trip when their share rises by this much (absolute)."""
    eval_repeat_rise: float = ranged(0.08, PROBABILITY)
    """Evaluation repeated 4-gram share: trip when it rises by this much (absolute)."""
    eval_box_rise: float = ranged(0.2, PROBABILITY)
    """Evaluation answers with several \\boxed: trip when their share rises by this much (absolute)."""
    min_abs: float = ranged(1e-6, NON_NEGATIVE)
    """Floor of the spike rules' median (a baseline of zeros does not make every value a spike)."""
