"""EffOPD on top of ESR vs plain ESR: held-out reverse KL against steps and against wall-clock, same seed.

Both arms are built in one process (the teacher is shared) and their steps are interleaved (A step 1, B step 1,
A step 2, ...), so machine load falls on both alike. Arm B runs the Extrapolator after its optimizer step at powers
of two with the default probe (mean reverse KL on 8 fixed held-out rollouts). Every few steps both students are
measured on 16 OTHER held-out prompts (fixed rollouts sampled once from the common initial student); at the end
each student also samples fresh rollouts on them (on-policy KL). Measurement time is not counted as training time.
Both wall-clock and process CPU seconds are recorded per arm (CPU time is what to compare if something else loaded
the machine during the run).

    python benchmarks/extrapolate.py                                  # xfamily pair (SmolLM2-135M <- Qwen 0.5B)
    python benchmarks/extrapolate.py --config configs/quickstart.yaml --steps 16
    python benchmarks/extrapolate.py --tiny                           # tiny models: checks the script in seconds

Writes benchmarks/results/extrapolate.{json,png} (``--out`` to change).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from esr.config import load_config
from esr.data.heldout import HeldOutPrompts, heldout_prompts
from esr.optim import make_extrapolator
from esr.optim.probe import kl_probe
from esr.plots import new_figure, save_png
from esr.train.loop import run_step
from esr.train.session import build_session

MEASURE_SEED = 0x3EA5


def measure_prompts(cfg, tokenizer, n: int) -> HeldOutPrompts:
    """n held-out prompts after those the periodic eval and the extrapolation probe use."""
    skip = cfg.eval.limit + cfg.optim.extrapolate.probe_size
    held = heldout_prompts(cfg, tokenizer, skip + n)
    return HeldOutPrompts(held.prompt_ids[skip:], held.ids[skip:], held.how, held.prompts[skip:])


def build_arms(config: str, steps: int, overrides: list[str]) -> tuple[dict, dict]:
    """The two arms' configs and sessions (one teacher, shared)."""
    base = [f"train.steps={steps}", *overrides]
    arms = {"ESR": load_config(config, base),
            "ESR + EffOPD": load_config(config, [*base, "optim.extrapolate.enabled=true"])}
    sessions = {}
    for name, cfg in arms.items():
        sessions[name] = build_session(cfg)
        if len(sessions) > 1:  # one teacher for both arms
            first = next(iter(sessions.values()))
            sessions[name] = dataclasses.replace(sessions[name], teacher=first.teacher, scorer=first.scorer)
            gc.collect()
    return arms, sessions


def train_side_by_side(arms: dict, sessions: dict, extrapolator, meters: dict, steps: int, every: int) -> dict:
    """Interleave the arms' steps; held-out KL every ``every`` steps; wall-clock and CPU seconds per arm."""
    curves = {name: [{"step": 0, "seconds": 0.0, "cpu_seconds": 0.0, "heldout_kl": meters[name]()}] for name in arms}
    clock, cpu = dict.fromkeys(arms, 0.0), dict.fromkeys(arms, 0.0)
    train_kl, events = {name: [] for name in arms}, []
    for step in range(steps):
        for name, s in sessions.items():
            t0, c0 = time.perf_counter(), time.process_time()
            m = run_step(s, arms[name], step)
            if name == "ESR + EffOPD" and extrapolator.due(step + 1):
                events.append(e := extrapolator.extrapolate(step + 1).as_row())
                print(f"  extrapolate step {step + 1}: probe {e['score_before']:.4f} -> {e['score_after']:.4f}, "
                      f"accepted {e['alphas_accepted']} ({e['seconds']:.1f}s)", flush=True)
            clock[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
            train_kl[name].append(m.kl)
            if (step + 1) % every == 0 or step + 1 == steps:
                curves[name].append({"step": step + 1, "seconds": clock[name], "cpu_seconds": cpu[name],
                                     "heldout_kl": meters[name]()})
        print(f"step {step + 1}/{steps}  " + "  ".join(
            f"{n}: {clock[n]:.0f}s kl {train_kl[n][-1]:.4f} held-out {curves[n][-1]['heldout_kl']:.4f}"
            for n in arms), flush=True)
    return {"curves": curves, "train_kl": train_kl, "events": events, "seconds_per_arm": clock,
            "cpu_seconds_per_arm": cpu, "extrapolation_seconds": sum(e["seconds"] for e in events)}


def plot(result: dict, path: Path) -> None:
    fig, (ax_steps, ax_time) = new_figure(2, width=11.0, height=4.0)
    for name, points in result["curves"].items():
        ax_steps.plot([p["step"] for p in points], [p["heldout_kl"] for p in points], marker="o", label=name)
        ax_time.plot([p["seconds"] / 60 for p in points], [p["heldout_kl"] for p in points], marker="o", label=name)
    for e in result["events"]:
        ax_steps.axvline(e["step"], color="grey", alpha=0.25 + 0.5 * bool(e["accepted"]), lw=0.8)
    ax_steps.set(xlabel="optimizer step", ylabel="held-out reverse KL per token", title="against steps")
    ax_time.set(xlabel="training wall-clock (min)", ylabel="held-out reverse KL per token", title="against time")
    ax_steps.legend()
    save_png(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart-xfamily.yaml")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--every", type=int, default=4, help="measure held-out KL every this many steps")
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/extrapolate")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    config = "configs/smoke.yaml" if args.tiny else args.config
    arms, sessions = build_arms(config, args.steps, args.overrides)
    s_a, s_b = sessions.values()
    with TemporaryDirectory() as tmp:
        extrapolator = make_extrapolator(s_b, arms["ESR + EffOPD"], Path(tmp))
    held = measure_prompts(arms["ESR"], s_a.tokenizer, args.heldout)
    fixed = s_a.sampler.sample(held.prompt_ids, s_a.policy.plan(0), seed=MEASURE_SEED)
    meters = {name: kl_probe(s, arms[name], held, fixed) for name, s in sessions.items()}
    result = train_side_by_side(arms, sessions, extrapolator, meters, args.steps, args.every)

    on_policy = {}  # fresh rollouts of each final student on the same prompts
    for name, s in sessions.items():
        fresh = s.sampler.sample(held.prompt_ids, s.policy.plan(0), seed=MEASURE_SEED + 1)
        on_policy[name] = kl_probe(s, arms[name], held, fresh)()
    # Steps / seconds EffOPD needs to reach plain ESR's final held-out KL (the paper's "acceleration").
    target = result["curves"]["ESR"][-1]["heldout_kl"]
    reach = next((p for p in result["curves"]["ESR + EffOPD"] if p["heldout_kl"] <= target), None)
    result = {
        "config": config, "steps": args.steps, "overrides": args.overrides,
        "batch_size": arms["ESR"].train.batch_size, "heldout_prompts": len(held.prompt_ids), "heldout_ids": held.ids,
        **result, "on_policy_heldout_kl": on_policy, "target_kl": target, "effopd_reaches_target_at": reach,
        "theta_base_mb": sum(b.numel() * b.element_size() for b in extrapolator.base) / 1e6,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    keys = ("on_policy_heldout_kl", "target_kl", "effopd_reaches_target_at", "seconds_per_arm", "cpu_seconds_per_arm",
            "extrapolation_seconds", "theta_base_mb")
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    for name, points in result["curves"].items():
        print(name, " ".join(f"{p['step']}:{p['heldout_kl']:.4f}" for p in points))


if __name__ == "__main__":
    main()
