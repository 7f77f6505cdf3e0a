"""The collapse guard in a real run on the tiny pair (configs/smoke.yaml): a forced collapse (full fine-tuning at
lr 0.5: the KL jumps from 0.03 to > 1 after one step) trips it; rollback goes back to the starting weights with a
lower rate, max_trips stops the run; warn only warns; a healthy run never trips; a resume after a rollback is exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from esr.config import load_config
from esr.report.build import write_report
from esr.train import resume, train
from esr.train.rollback import GuardStopError

COLLAPSE = ["train.finetune=full", "train.lr=0.5", "train.guard.baseline_steps=1", "train.guard.window=1",
            "train.checkpoint_every=100"]


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "guard" / "events.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next(folder.glob("model*.safetensors")))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GuardStopError]:
    """A forced collapse with max_trips 2: trip 1 rolls back to step 0, trip 2 stops the run."""
    run = tmp_path_factory.mktemp("guard") / "collapse"
    cfg = load_config("configs/smoke.yaml", [*COLLAPSE, "train.steps=4", "train.guard.max_trips=2"])
    with pytest.raises(GuardStopError) as e:
        train(cfg, run, progress=False)
    return run, e.value


def test_collapse_trips_rolls_back_to_identical_weights_and_stops(stopped: tuple[Path, GuardStopError]) -> None:
    run, error = stopped
    events = _events(run)
    assert [e["action"] for e in events][:1] == ["rollback"] and events[-1]["action"] == "stop"
    assert {e["trip"] for e in events} == {1, 2}
    assert events[0]["signal"] in ("loss", "grad_norm") and events[0]["value"] > events[0]["threshold"]
    assert [e["lr_scale"] for e in events if e["trip"] == 2][0] == 0.5  # the rate was halved after the rollback
    # The run's step-0 checkpoint was written just after the rollback loaded the guard's copy: same weights.
    kept, restored = _weights(run / "guard" / "checkpoints" / "step-000000"), _weights(run / "checkpoints" /
                                                                                      "step-000000")
    assert kept.keys() == restored.keys() and all(torch.equal(kept[k], restored[k]) for k in kept)
    state = json.loads((run / "checkpoints" / "step-000000" / "trainer" / "trainer_state.json").read_text())
    assert state["guard"] == {"trips": 1, "lr_scale": 0.5}
    assert (run / "guard" / "rolled-back-metrics.jsonl").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == events[-1]["step"] and metrics[0]["lr"] == pytest.approx(0.25)
    assert "tripped 2 times" in str(error) and "events.jsonl" in str(error)


def test_warn_only_warns_and_a_healthy_run_never_trips(tmp_path: Path) -> None:
    warn = load_config("configs/smoke.yaml", [*COLLAPSE, "train.steps=3", "train.guard.policy=warn"])
    result = train(warn, tmp_path / "warn", progress=False)
    assert len(result.metrics) == 3 and {e["action"] for e in _events(tmp_path / "warn")} == {"warn"}
    assert not (tmp_path / "warn" / "guard" / "checkpoints").exists()  # warn keeps no starting copy
    healthy = load_config("configs/smoke.yaml", ["train.steps=4", "train.guard.baseline_steps=1",
                                                 "train.guard.window=1", "eval.every=4", "eval.limit=2",
                                                 "eval.max_new_tokens=8", "train.guard.eval_at_start=true"])
    train(healthy, tmp_path / "healthy", progress=False)
    assert not (tmp_path / "healthy" / "guard" / "events.jsonl").exists()
    history = [json.loads(line) for line in (tmp_path / "healthy" / "eval" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [0, 4]  # eval_at_start: the starting weights are the eval baseline


def test_resume_after_a_rollback_is_exact(stopped: tuple[Path, GuardStopError], tmp_path: Path) -> None:
    """Resumed from the checkpoint the rollback re-saved (trips 1, lr x0.5), the run replays the steps after it
    exactly as the rolled-back run did (same losses and rates), and trips and stops at the same step."""
    run, _ = stopped
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    with pytest.raises(GuardStopError):
        resume(copy, progress=False)
    after = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "loss", "kl", "grad_norm", "lr", "tokens_generated", "repeated_4gram_share")
    assert [[m[k] for k in keys] for m in after] == [[m[k] for k in keys] for m in before]


def test_report_lists_the_guard_events(stopped: tuple[Path, GuardStopError], tmp_path: Path) -> None:
    run, _ = stopped
    _, md = write_report([run], tmp_path / "report.html")
    text = md.read_text()
    assert "## Collapse guard" in text and "rollback" in text and "stop" in text


def test_a_rollback_also_restores_the_auto_horizon(tmp_path: Path) -> None:
    """rollout.horizon=auto with a probe before every step: the rollback to the starting weights puts N and the
    running profile back too, so the replayed step 1 probes and plans exactly as the first step 1 did, and
    auto/profile.jsonl is cut back (one line per step, no step twice)."""
    run = tmp_path / "auto"
    cfg = load_config("configs/smoke.yaml", [*COLLAPSE, "train.steps=4", "train.guard.max_trips=2",
                                             "rollout.horizon=auto", "rollout.n=4", "rollout.auto.n_min=1",
                                             "rollout.auto.every=1", "rollout.auto.rollouts=2"])
    with pytest.raises(GuardStopError):
        train(cfg, run, progress=False)
    lines = (run / "guard" / "rolled-back-metrics.jsonl").read_text().splitlines()
    rolled = {m["step"]: m for m in map(json.loads, lines)}
    metrics = {m["step"]: m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert rolled[1]["horizon"] == metrics[1]["horizon"] and rolled[1]["probe_kl"] == metrics[1]["probe_kl"]
    steps = [json.loads(line)["step"] for line in (run / "auto" / "profile.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[0] == 1
    state = json.loads((run / "checkpoints" / "step-000000" / "trainer" / "trainer_state.json").read_text())
    assert state["auto_horizon"]["n"] == 4 and state["auto_horizon"]["profile"] is None  # as before any probe
