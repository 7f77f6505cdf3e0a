"""Extending a finished run with `esr train --resume RUN train.steps=N`: the extended run ends bit for bit where a
run started with N ends (weights, AdamW state, metrics, learning rates through a warm-up that spans the extension);
keys that would change what the checkpoints were computed with are refused, naming the key."""

from __future__ import annotations

import json

import torch
from esr_process import assert_user_error, run_esr
from safetensors.torch import load_file

from esr.cli import main
from esr.config import load_config
from esr.models.checkpoints import list_checkpoints
from esr.train import train
from esr.train.extend import started_config

SMOKE = "configs/smoke.yaml"
WARMUP = ["train.warmup_steps=6"]  # the warm-up runs on past the first run's 4 steps, into the extension
LIGHT = ["train.batch_size=2", "rollout.n=8"]  # cheap steps
VOLATILE = {"seconds_align", "seconds_generate", "seconds_score", "seconds_train", "peak_mem_gb"}


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_finished_run_extended_ends_identical_to_an_uninterrupted_run(tmp_path, needs_smollm2_package):
    run = tmp_path / "run"
    train(load_config(SMOKE, ["train.steps=4", *WARMUP, *LIGHT]), run, progress=False)
    proc = run_esr("train", "--resume", run, "train.steps=8", "train.checkpoint_every=3", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr

    whole = train(load_config(SMOKE, ["train.steps=8", *WARMUP, *LIGHT]), tmp_path / "whole", progress=False)
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, 9))  # each step once: 1-4 kept, 5-8 added
    assert _stable(rows) == _stable(whole.metrics)  # losses, KL, grad norms, learning rates: all equal
    assert [r["lr"] for r in rows] == [1e-3 * min(1.0, k / 6) for k in range(1, 9)]  # the warm-up went on
    # Checkpoints: the finished run's (2, 4), then the new cadence (every 3) and the new end.
    assert [p.name for p in list_checkpoints(run)] == [f"step-{s:06d}" for s in (2, 4, 6, 8)]
    a_dir, b_dir = whole.last_checkpoint, run / "checkpoints" / "step-000008"
    a, b = load_file(a_dir / "adapter_model.safetensors"), load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = torch.load(a_dir / "trainer" / "trainer_state.pt", weights_only=True)
    b = torch.load(b_dir / "trainer" / "trainer_state.pt", weights_only=True)
    assert a["scheduler"] == b["scheduler"]
    for i in a["optimizer"]["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["optimizer"]["state"][i][key], b["optimizer"]["state"][i][key]), (i, key)

    # The new values live in the run's config (a plain --resume continues to 8), and the extension is recorded.
    cfg = load_config(run / "config.yaml")
    assert (cfg.train.steps, cfg.train.checkpoint_every) == (8, 3)
    (record,) = json.loads((run / "run.json").read_text())["extensions"]
    assert record["at_step"] == 4
    assert record["changed"] == {"train.steps": [4, 8], "train.checkpoint_every": [2, 3]}


def test_resume_refuses_other_keys_and_steps_below_the_checkpoints(tmp_path, capsys, needs_smollm2_package):
    run = tmp_path / "run"
    train(load_config(SMOKE, ["train.steps=2", *LIGHT]), run, progress=False)
    config_before, run_json_before = (run / "config.yaml").read_text(), (run / "run.json").read_text()

    message = assert_user_error(run_esr("train", "--resume", run, "train.steps=4", "train.lr=1", "--no-progress"),
                                "train.lr", "cannot change", "train.lr=0.001", "--out")
    assert "train.steps, train.checkpoint_every, eval.every" in message

    # Further cases in-process (the real process above proved the CLI path): the same one-line errors, exit 2.
    for overrides, needles in [
        (["train.steps=1"], ("train.steps=1", "below the 2 steps", "train.steps=2 or more")),
        (["seed=3"], ("seed cannot change",)),
        (["rollout.n=8"], ("rollout.n cannot change",)),
        (["train.steps=6", "data.size=64"], ("data.size cannot change",)),
    ]:
        assert main(["train", "--resume", str(run), *overrides, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and all(n in err for n in needles), err
    # Nothing was changed by a refused extension, and the folder still resumes (a finished run: nothing to do).
    assert (run / "config.yaml").read_text() == config_before
    assert (run / "run.json").read_text() == run_json_before
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert [r["step"] for r in _rows(run)] == [1, 2]


def test_the_effopd_probe_keeps_the_config_the_run_started_with(tmp_path):
    """With a file data source EffOPD's held-out probe prompts depend on train.steps (esr.data.heldout): an extended
    run rebuilds its probe from the values the run started with, recorded in run.json, not from the new ones."""
    cfg = load_config(SMOKE, ["train.steps=8", "train.checkpoint_every=3"])
    assert started_config(cfg, tmp_path) is cfg  # never extended
    record = {"time": "t", "at_step": 4, "changed": {"train.steps": [4, 6], "train.checkpoint_every": [2, 3]}}
    later = {"time": "t", "at_step": 6, "changed": {"train.steps": [6, 8]}}
    (tmp_path / "run.json").write_text(json.dumps({"device": "cpu", "extensions": [record, later]}))
    first = started_config(cfg, tmp_path)
    assert (first.train.steps, first.train.checkpoint_every) == (4, 2)
    assert first.rollout == cfg.rollout and first.data == cfg.data and first.train.lr == cfg.train.lr
