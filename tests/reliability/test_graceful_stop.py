"""Ctrl-C and SIGTERM sent to a real `esr train` process: the first one finishes the step, checkpoints it and exits
with the resume command (130 for SIGINT, 143 for SIGTERM); a second one stops at once. Either way the folder resumes,
and a resumed run ends bit for bit where an uninterrupted one does."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from esr_process import REPO, esr_cmd, esr_env
from safetensors.torch import load_file

from esr.cli import main
from esr.config import load_config
from esr.models.checkpoints import latest_checkpoint, list_checkpoints
from esr.train import train

SMOKE = "configs/smoke.yaml"
LONG = ["train.steps=40", "train.checkpoint_every=1000"]  # long enough to be stopped; no checkpoint by cadence
LIGHT = ["train.batch_size=2", "rollout.n=8"]  # cheaper steps where their length does not matter
# Steps of ~3.5 s (every rollout 384 tokens long) where a second signal must land inside the step the first one
# announced: a default smoke step (~0.3 s) can end before it arrives on a loaded machine.
SLOW = ["rollout.horizon=full", "rollout.max_new_tokens=384", "rollout.min_new_tokens=384"]


class Child:
    """`esr train ...` in a child process, its stderr collected line by line as it comes."""

    def __init__(self, *args: str | Path, sigint_ignored: bool = False) -> None:
        """``sigint_ignored``: start it with SIGINT ignored, as a shell script's ``esr train ... &`` does."""
        ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
        self.proc = subprocess.Popen(esr_cmd(*args), cwd=REPO, env=esr_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, preexec_fn=ignore)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def wait_for(self, what: str, ready, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"esr exited ({self.proc.returncode}) before {what}:\n{self.stderr}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{self.stderr}"
            time.sleep(0.05)

    def finish(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


def _logged_steps(run: Path, torn_ok: bool = False) -> list[int]:
    """The steps of metrics.jsonl's lines; ``torn_ok``: skip a torn last line (an at-once stop may cut one)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    if torn_ok and lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines = lines[:-1]
    return [json.loads(line)["step"] for line in lines]


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_first_signal_finishes_the_step_checkpoints_and_prints_the_resume_command(tmp_path, signal_name,
                                                                                 needs_smollm2_package):
    run = tmp_path / "run"
    child = Child("train", SMOKE, *LONG, *LIGHT, "--out", run, "--no-progress")
    child.wait_for("step 1 in metrics.jsonl", lambda: len(_logged_steps(run, torn_ok=True)) >= 1)
    child.proc.send_signal(getattr(signal, signal_name))
    code = child.finish()

    assert code == {"SIGINT": 130, "SIGTERM": 143}[signal_name], child.stderr[-3000:]
    assert "Traceback" not in child.stderr, child.stderr[-3000:]
    steps = _logged_steps(run)  # every line parses: the step under way was finished and logged
    k = steps[-1]
    assert steps == list(range(1, k + 1)) and k < 40
    lines = [line.rstrip("\n") for line in child.lines if line.strip()]
    assert f"esr: {signal_name} received: stopping after this step" in child.stderr
    assert lines[-1] == f"esr: stopped after step {k} (checkpoint written); continue with: esr train --resume {run}"
    assert latest_checkpoint(run).name == f"step-{k:06d}"  # written by the stop: the cadence (1000) wrote none
    assert json.loads((latest_checkpoint(run) / "trainer" / "trainer_state.json").read_text())["step"] == k

    # Resumable: continue (here to k + 2, extending past the stop) and end where an uninterrupted run ends.
    assert main(["train", "--resume", str(run), f"train.steps={k + 2}", "--no-progress"]) == 0
    assert _logged_steps(run) == list(range(1, k + 3))
    whole = train(load_config(SMOKE, [f"train.steps={k + 2}", *LIGHT]), tmp_path / "whole", progress=False)
    a, b = _adapter(whole.last_checkpoint), _adapter(latest_checkpoint(run))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_a_second_signal_stops_at_once_and_the_folder_still_resumes(tmp_path, needs_smollm2_package, inherited):
    run = tmp_path / "run"
    child = Child("train", SMOKE, *LONG, *SLOW, "train.checkpoint_every=2", "--out", run, "--no-progress",
                  sigint_ignored=inherited == "ignored")
    # After step 3's line (no checkpoint due at 3) and past step 3's stop check (which follows its line at once), so
    # both signals land in step 4's work: a signal sent just as the line appears can still stop after step 3.
    child.wait_for("step 3 in metrics.jsonl", lambda: len(_logged_steps(run, torn_ok=True)) >= 3)
    time.sleep(1.0)
    child.proc.send_signal(signal.SIGINT)
    child.wait_for("the first signal's note", lambda: "SIGINT received" in child.stderr)
    child.proc.send_signal(signal.SIGINT)  # while the step is still under way: today's KeyboardInterrupt
    code = child.finish()

    assert code == 130, child.stderr[-3000:]
    assert "Traceback" not in child.stderr, child.stderr[-3000:]
    lines = [line.rstrip("\n") for line in child.lines if line.strip()]
    assert lines[-1] == f"esr: interrupted; continue with: esr train --resume {run}", child.stderr[-3000:]
    assert "stopped after step" not in child.stderr  # it did not wait for the step to end
    k = _logged_steps(run, torn_ok=True)[-1]
    saved = [int(p.name.split("-")[1]) for p in list_checkpoints(run)]
    assert all(s % 2 == 0 and s <= k for s in saved), (saved, k)  # the cadence's only: no stop checkpoint
    newest = saved[-1] if saved else 0
    assert main(["train", "--resume", str(run), f"train.steps={newest + 1}", "--no-progress"]) == 0
    assert _logged_steps(run) == list(range(1, newest + 2))
    assert [p.name for p in list_checkpoints(run)][-1] == f"step-{newest + 1:06d}"
