"""metrics.jsonl and its TensorBoard mirror (the [tensorboard] extra; the [test] extra installs it)."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import pytest

from esr.train.metrics import MetricsLog, StepMetrics


def _metrics(step: int, kl: float) -> StepMetrics:
    numbers = {f.name: 0.0 for f in dataclasses.fields(StepMetrics) if f.name not in ("step", "skipped")}
    return StepMetrics(step=step, **{**numbers, "kl": kl, "horizon": 100})


def test_tensorboard_gets_every_step_scalar_and_the_eval_numbers(tmp_path: Path):
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra: pip install -e '.[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path)
    log.write(_metrics(1, 0.5))
    log.write(_metrics(2, 0.25))
    log.scalars("eval", 2, {"accuracy": 0.75, "task": "gsm8k"})
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/kl")] == [(1, 0.5), (2, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(2, 0.75)]
    assert "train/step" not in events.Tags()["scalars"]
    assert [row["kl"] for row in log.read()] == [0.5, 0.25]


def test_without_tensorboard_the_log_says_how_to_install_it_and_jsonl_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import raise ImportError
    with caplog.at_level(logging.INFO, logger="esr.train"):
        log = MetricsLog(tmp_path)
    log.write(_metrics(1, 0.5))
    assert "pip install 'esr-distill[tensorboard]'" in caplog.text
    assert not (tmp_path / "tb").exists() and log.read()[0]["kl"] == 0.5
