"""The probes of ``rollout.horizon=auto``: every ``rollout.auto.every`` steps, before the step, a few held-out
rollouts to ``rollout.max_new_tokens`` update the running KL profile and N (esr/rollout/auto_horizon.py).

A probe samples ``rollout.auto.rollouts`` held-out prompts (``esr.data.heldout``: never drawn by training) with the
session's own sampler and the student's current weights, seeded by (seed, step) so a resumed run probes the very
same tokens; the session's scorer scores them without gradient (same tokenizer, or aligned across tokenizers, as
the EffOPD KL probe does: ``esr.optim.probe.kl_probe``); the per-position reverse KL mass per rollout goes into the
profile. What it costs is logged with the step it precedes:

    probe_kl       mean reverse KL per probe token (over all its scored tokens)
    probe_seconds  the probe's wall time
    probe_flops    2 * N_s * (sampled + read tokens) + 2 * N_t * teacher tokens (``step_flops``'s rule)
    probe_share    probe seconds / (step + probe seconds), over the run so far (every step of an auto run)

and ``RUN/auto/profile.jsonl`` gets one line per probe: the 1-based step it precedes, N before and after, probe_kl
and the running per-position profile.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from esr.config import Config
from esr.data.heldout import HeldOutPrompts, heldout_prompts
from esr.optim.probe import kl_probe
from esr.rollout.auto_horizon import AutoHorizon
from esr.train.checkpoint import CheckpointError
from esr.train.distributed import main_only
from esr.train.metrics import StepMetrics, append_jsonl
from esr.train.session import Session

AUTO_PROBE_SEED = 0xA070
"""Mixed into the run seed for sampling the probe rollouts (a stream apart from training's and EffOPD's)."""

STATE_KEY = "auto_horizon"
"""The key of the policy's state in a checkpoint's trainer_state.json."""


class HorizonProbe:
    """Runs the probes of an auto run and adds their metrics to the steps (module docstring)."""

    def __init__(self, s: Session, cfg: Config, started: Config, run_dir: Path) -> None:
        assert isinstance(s.policy, AutoHorizon)
        self.policy, self.cfg = s.policy, cfg
        self.held: HeldOutPrompts = heldout_prompts(started, s.tokenizer, cfg.rollout.auto.rollouts)
        self.path = run_dir / "auto" / "profile.jsonl"

    def due(self, step: int) -> bool:
        """Whether a probe runs before 0-based step ``step`` (the first before step 1, then every ``auto.every``)."""
        return step % self.cfg.rollout.auto.every == 0

    def probe(self, s: Session, step: int) -> dict[str, float]:
        """Probe before 0-based ``step``: sample, score, update the profile and N; log the profile. Returns the
        probe's metrics (none when not due)."""
        if not self.due(step):
            return {}
        cfg, t0, before = self.cfg, time.perf_counter(), self.policy.n
        s.sampler.sync_weights(s.student)  # an engine with its own copy of the weights takes the current ones
        rollouts = s.sampler.sample(self.held.prompt_ids, cfg.rollout.max_new_tokens,
                                    seed=AUTO_PROBE_SEED + cfg.seed * 1_000_003 + step)
        probe = kl_probe(s, cfg, self.held, rollouts)
        mass_R = probe.per_position()
        n = self.policy.update((mass_R / len(rollouts)).numpy())
        tokens = int(probe.mask_B_R.sum())
        kl = float(mass_R.sum()) / max(1, tokens)
        seconds = time.perf_counter() - t0
        teacher_tokens = int(rollouts.attention_mask_B_L.sum())  # the student's count (across tokenizers, about)
        flops = (2.0 * s.info["student_params"] * (int(rollouts.lengths_B.sum()) + probe.tokens)
                 + 2.0 * s.info["teacher_params"] * teacher_tokens)
        profile = self.policy.profile_T
        main_only(append_jsonl, self.path, {"step": step + 1, "n_before": before, "n": n, "probe_kl": kl,
                                            "probe_tokens": tokens, "seconds": seconds,
                                            "profile": [float(x) for x in profile]})
        return {"probe_kl": kl, "probe_seconds": seconds, "probe_flops": flops}

    def record(self, metrics: StepMetrics, probed: dict[str, float]) -> StepMetrics:
        """The step's metrics with its probe's and the run's probe share so far."""
        self.policy.seconds_probe += probed.get("probe_seconds", 0.0)
        self.policy.seconds_run += (probed.get("probe_seconds", 0.0) + metrics.seconds_generate
                                    + metrics.seconds_score + metrics.seconds_train + metrics.seconds_align
                                    + metrics.seconds_extrapolate)
        share = self.policy.seconds_probe / self.policy.seconds_run if self.policy.seconds_run > 0 else 0.0
        return dataclasses.replace(metrics, **probed, probe_share=share)


def make_horizon_probe(s: Session, cfg: Config, started: Config, run_dir: Path) -> HorizonProbe | None:
    """The run's HorizonProbe with ``rollout.horizon=auto``, else None. ``started``: the config the run started
    with (its held-out prompts stay those when the run is extended)."""
    return HorizonProbe(s, cfg, started, run_dir) if cfg.rollout.horizon == "auto" else None


def horizon_state(policy: Any) -> dict[str, Any]:
    """What a checkpoint keeps of the horizon policy: the auto policy's state, nothing for the pure ones."""
    return {STATE_KEY: policy.state_dict()} if isinstance(policy, AutoHorizon) else {}


def restore_horizon(policy: Any, state: dict[str, Any], folder: Path) -> None:
    """Put the checkpointed auto policy state back (N, the running profile, the probe seconds)."""
    if not isinstance(policy, AutoHorizon):
        return
    if STATE_KEY not in state:
        raise CheckpointError(f"{folder} has no rollout.horizon=auto state (it was written with another horizon); "
                              "resume it with the horizon it was started with or start a new run")
    policy.load_state_dict(state[STATE_KEY])
