"""SIGKILL at random moments of a real training run (generation, teacher scoring, the optimizer step, a checkpoint
write, and at random times), resumed each time: the end state must equal an uninterrupted run's, bit for bit.

Each interrupted attempt is a separate `python` process running `esr.train` on the tiny smoke models; a kill at a
chosen phase is injected by wrapping that phase's function in the child so that it sends SIGKILL to its own process
(no cleanup, no flush: what a power cut or the OOM killer does). Random-time kills come from the parent.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from esr_process import esr_cmd, esr_env
from safetensors.torch import load_file

from esr.config import load_config
from esr.train import train

SMOKE = "configs/smoke.yaml"
STEPS = 16
OVERRIDES = [f"train.steps={STEPS}", "train.checkpoint_every=2", "optim.extrapolate.enabled=true",
             "optim.extrapolate.carry_alpha=true", "optim.extrapolate.probe_size=4"]
VOLATILE = {"seconds_align", "seconds_generate", "seconds_score", "seconds_train", "seconds_extrapolate",
            "peak_mem_gb"}

CHILD = textwrap.dedent('''
    import json, os, signal, sys
    from pathlib import Path

    run_dir, overrides, phase, nth = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])

    def kill_at(owner, name, after=False):
        real, calls = getattr(owner, name), [0]
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == nth and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            out = real(*args, **kwargs)
            if calls[0] == nth and after:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        setattr(owner, name, wrapper)

    import torch
    import esr.rollout.sampler, esr.teacher.score, esr.train.checkpoint, esr.train.metrics
    targets = {
        "generate": (esr.rollout.sampler.HFSampler, "sample", False),
        "score": (esr.teacher.score.LocalScorer, "score", False),
        "optimizer": (torch.optim.AdamW, "step", False),
        "after-optimizer": (torch.optim.AdamW, "step", True),
        "checkpoint-files-written": (esr.train.checkpoint, "_fsync_tree", False),
        "checkpoint-adapter-written": (esr.train.checkpoint, "save_lora", True),
        "metrics-line-written": (esr.train.metrics, "append_jsonl", True),
    }
    if phase in targets:
        kill_at(*targets[phase])

    from esr.config import load_config
    from esr.train import resume, train
    if (Path(run_dir) / "config.yaml").is_file():
        resume(run_dir, progress=False)
    else:
        train(load_config("configs/smoke.yaml", overrides), run_dir, progress=False)
''')

# (phase, nth call) per attempt; each attempt resumes the previous one's folder from its last checkpoint (every 2
# steps). Calls per attempt: generate 1 per step (+1 for the EffOPD probe rollouts in the very first attempt), teacher
# score 2 per step (+2 at every start: the probe's teacher pass), AdamW step and metrics line 1 per step, checkpoint
# files 1 per checkpoint. So the attempts die in: step 3 (generate), step 5 (score), step 6 before its update, the
# checkpoint of step 6 before its rename, step 7 after its update, the checkpoint of step 10 after its adapter is
# written, step 10 after its metrics line; then twice at random times; then the last attempt finishes.
PLAN = [("generate", 4), ("score", 7), ("optimizer", 2), ("checkpoint-files-written", 1), ("after-optimizer", 3),
        ("checkpoint-adapter-written", 2), ("metrics-line-written", 2), ("random", 0), ("random", 0)]


def _attempt(run_dir: Path, phase: str, nth: int, rng: random.Random) -> int:
    args = [sys.executable, "-c", CHILD, str(run_dir), json.dumps(OVERRIDES), phase, str(nth)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).parents[2])
    if phase == "random":
        try:
            proc.wait(timeout=rng.uniform(4.0, 9.0))  # imports take a few seconds; training ~0.5 s a step
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-3000:]
    return proc.returncode


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def test_sigkill_anywhere_then_resume_ends_identical_to_an_uninterrupted_run(tmp_path, needs_smollm2_package):
    whole = train(load_config(SMOKE, OVERRIDES), tmp_path / "whole", progress=False)

    run, rng = tmp_path / "killed", random.Random(0)
    for phase, nth in PLAN:
        code = _attempt(run, phase, nth, rng)
        assert code == -signal.SIGKILL or phase == "random", f"the {phase} kill never fired: the plan is stale"
        leftovers = list((run / "checkpoints").glob("*.tmp-*")) if (run / "checkpoints").is_dir() else []
        for folder in (run / "checkpoints").glob("step-*") if (run / "checkpoints").is_dir() else []:
            if folder in leftovers:
                continue
            # Every checkpoint folder under its final name is complete: it loads.
            assert (folder / "trainer" / "trainer_state.json").is_file()
            assert (folder / "adapter_model.safetensors").is_file()
            torch.load(folder / "trainer" / "trainer_state.pt", weights_only=True)
    assert _attempt(run, "none", 0, rng) == 0  # the last resume finishes

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # no step lost, none twice
    assert _stable(rows) == _stable(whole.metrics)
    events = [json.loads(line) for line in (run / "extrapolate" / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [1, 2, 4, 8, 16]
    assert not list((run / "checkpoints").glob("*.tmp-*")) and not list((run / "checkpoints").glob("*.old-*"))

    a_dir, b_dir = whole.last_checkpoint, run / "checkpoints" / f"step-{STEPS:06d}"
    for name in ("adapter_model.safetensors", "trainer/extrapolator.safetensors"):
        a, b = load_file(a_dir / name), load_file(b_dir / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a = torch.load(a_dir / "trainer" / "trainer_state.pt", weights_only=True)["optimizer"]
    b = torch.load(b_dir / "trainer" / "trainer_state.pt", weights_only=True)["optimizer"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["state"][i][key], b["state"][i][key]), (i, key)


def test_a_kill_while_resaving_a_step_keeps_the_old_copy(tmp_path, needs_smollm2_package):
    """Re-saving a step sets the old folder aside first; a crash between the two renames leaves it, and resume puts
    it back."""
    from esr.train.checkpoint import latest_checkpoint, remove_partial_checkpoints

    train(load_config(SMOKE, ["train.steps=2"]), tmp_path / "r", progress=False)
    final = tmp_path / "r" / "checkpoints" / "step-000002"
    aside = final.with_name(final.name + ".old-12345")
    final.rename(aside)  # the moment between "set aside" and "new one in place"
    remove_partial_checkpoints(tmp_path / "r")
    assert latest_checkpoint(tmp_path / "r") == final and not aside.exists()


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_polite_stops_leave_a_resumable_folder(tmp_path, signal_name, needs_smollm2_package):
    """SIGTERM / Ctrl-C (SIGINT) to `esr train` at a random moment: before the steps begin, Python's own behaviour
    (death by SIGTERM, KeyboardInterrupt); during them, a graceful stop after the step, checkpointed
    (tests/reliability/test_graceful_stop.py). Either way the folder resumes to the end, every step logged once."""
    run, sig = tmp_path / "r", getattr(signal, signal_name)
    proc = subprocess.Popen(esr_cmd("train", SMOKE, *OVERRIDES, "--out", run, "--no-progress"), env=esr_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).parents[2])
    try:
        proc.wait(timeout=7.0)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
    err = proc.communicate()[1].decode()
    assert "Traceback" not in err or proc.returncode == -sig, err[-3000:]  # a signal during imports: Python's
    if proc.returncode != 0 and "stopped after step" in err:  # graceful: the step it finished is checkpointed
        assert proc.returncode == 128 + sig, err[-3000:]
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, steps[-1] + 1)) and f"stopped after step {steps[-1]} " in err
        assert (run / "checkpoints" / f"step-{steps[-1]:06d}" / "trainer" / "trainer_state.json").is_file()
    else:  # finished, or stopped before the steps began (or a second signal's at-once path)
        assert proc.returncode in (0, 128 + sig, -sig), err[-3000:]
    assert _attempt(run, "none", 0, random.Random(0)) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
