"""The esr and floor arms of benchmarks/vs_trl.py: a few real training steps, timed, in their own process.

Runs in esr's environment, started by benchmarks/vs_trl.py with a JSON spec (config and overrides, the exact
prompts of every step, the settings) and writes back a JSON result, as benchmarks/trl_arm.py does for TRL:

    python benchmarks/esr_arm.py SPEC.json RESULT.json

Kinds (spec "kind"):
- "esr": esr's own step (esr.train.session.build_session + esr.train.loop.run_step), timed by its StepMetrics;
- "floor": the raw floor of benchmarks/step_time.py (plain generate + teacher forward + student forward/backward
  with full logits + AdamW; no esr code) on the same esr session.
Before any step it checks that the session would train on exactly the prompts the TRL arms get.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from typing import Any

if __package__:
    from benchmarks.measure import StepClock, arm_main, rss_gb, set_threads
else:  # run as a script: this folder is sys.path[0]
    from measure import StepClock, arm_main, rss_gb, set_threads


def run(spec: dict[str, Any]) -> dict[str, Any]:
    set_threads(spec["threads"])
    import torch

    if __package__:
        from benchmarks.step_time import floor_step
    else:
        from step_time import floor_step
    from esr.config import load_config
    from esr.rollout.policies import make_policy
    from esr.train.loop import run_step
    from esr.train.session import batch_indices, build_session

    kind, T, W, B = spec["kind"], spec["tokens"], spec["warmup_tokens"], spec["batch"]
    n_warmup, n_timed = spec["warmup_steps"], spec["steps"]
    cfg = load_config(spec["config"], spec["overrides"])
    cfg_warm = load_config(spec["config"], spec["warmup_overrides"])
    t0 = time.perf_counter()
    s = build_session(cfg)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_gb()
    s_warm = dataclasses.replace(s, policy=make_policy(cfg_warm.rollout))  # the session's policy sets the horizon

    def prompts(step: int) -> list[tuple[int, ...]]:  # what esr's own step `step` trains on
        return [s.prompt_ids[i] for i in batch_indices(len(s.prompt_ids), B, step, cfg.seed)]

    for step, rows in enumerate(spec["prompts"]):
        if [list(p) for p in prompts(step)] != [r["ids"] for r in rows]:
            raise RuntimeError(f"step {step}: the session's prompts differ from those the TRL arms get")

    clock = StepClock(n_warmup)
    losses: list[float] = []
    for step in range(n_warmup + n_timed):
        warm = step < n_warmup
        clock.begin()
        if kind == "esr":
            m = run_step(s_warm if warm else s, cfg_warm if warm else cfg, step)
            clock.add("generate", m.seconds_generate)
            clock.add("score", m.seconds_score)
            clock.tokens = m.tokens_generated
            losses.append(m.loss)
            clock.end(kl=m.kl, esr_seconds_train=m.seconds_train)
        else:
            n = W if warm else T
            phases = floor_step(s, prompts(step), n, step)
            clock.add("generate", phases["generate"])
            clock.add("score", phases["score"])
            clock.tokens = B * n  # min_new_tokens = max_new_tokens = n
            clock.end()
    return {
        "status": "ok", "steps": clock.steps, "load_s": load_s, "rss_after_load_gb": rss_loaded,
        "rss_before_timed_gb": clock.rss_before_timed_gb, **clock.peaks(), "losses": losses, "notes": [],
        "setup": _setup(kind, cfg, s, T),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "threads": torch.get_num_threads()},
    }


def _setup(kind: str, cfg: Any, s: Any, T: int) -> dict[str, Any]:
    """What the arm trained with, as the result records it beside the TRL arms' setup."""
    trainable = [p for p in s.student.parameters() if p.requires_grad]
    return {
        "trainer": "esr.train.loop.run_step" if kind == "esr" else "benchmarks/step_time.py floor_step",
        "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "generation": {"temperature": cfg.rollout.temperature, "top_k": 0, "top_p": cfg.rollout.top_p,
                       "min_new_tokens": T, "max_new_tokens": T, "use_cache": True,
                       "eos_token_id": s.sampler.eos_token_ids, "pad_token_id": s.sampler.pad_token_id},
        "horizon": cfg.rollout.horizon if kind == "esr" else "floor", "loss_chunk_size": cfg.loss.chunk_size,
        "optimizer": type(s.optimizer).__name__, "trainable_params": sum(p.numel() for p in trainable),
        "param_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in s.student.parameters()}),
        "loss": "exact reverse KL, untempered logits",
    }


if __name__ == "__main__":
    arm_main(run, __doc__)
