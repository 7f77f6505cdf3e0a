"""The collapse guard's detector (esr/train/guard.py) and the eval collapse warning (esr/train/evaluation.py), on
hand-made rows and replayed over the committed real histories of studies/results/: it must trip on the cross-family
collapse at lr 2e-4 and never on the healthy quickstart and cross-family lr 5e-5 runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esr.config import load_config
from esr.config.guard import GuardConfig
from esr.train.evaluation import PeriodicEval
from esr.train.guard import eval_trips, step_trips

RESULTS = Path(__file__).resolve().parent.parent / "studies" / "results"
G = GuardConfig()


def _replay(arm: dict) -> list:
    """Every trip the detector reports when fed the arm's per-step KL (as loss) and its evaluations one by one."""
    rows = [{"step": i + 1, "loss": kl, "kl": kl, "horizon": h} for i, (kl, h) in
            enumerate(zip(arm["kl"], arm["horizon"], strict=True))]
    evals = arm["evals"]
    return ([t for i in range(len(rows)) for t in step_trips(rows[: i + 1], G)]
            + [t for i in range(len(evals)) for t in eval_trips(evals[: i + 1], "accuracy", 40, G)])


@pytest.mark.parametrize("study", ["quickstart", "xfamily-lr5e-5"])
def test_healthy_real_histories_never_trip(study: str) -> None:
    for name, arm in json.loads((RESULTS / f"{study}.json").read_text())["arms"].items():
        assert _replay(arm) == [], f"{study} {name}"


def test_cross_family_collapse_at_lr_2e4_trips() -> None:
    arms = json.loads((RESULTS / "xfamily.json").read_text())["arms"]
    trips = _replay(arms["esr-100"])
    assert trips and trips[0].step == 8 and trips[0].signal == "eval_cut_share"  # 0.30 -> 0.775 at the first eval
    assert all(_replay(arm) for arm in arms.values())  # every arm of that study collapses (answers showing work 0)


def test_spikes_are_robust() -> None:
    base = [{"step": i + 1, "loss": v, "grad_norm": 1.0, "horizon": 10, "response_len_mean": 10.0}
            for i, v in enumerate([0.2, 0.25, 0.18, 0.22])]
    noisy = {"step": 5, "loss": 0.6, "grad_norm": 2.0, "horizon": 10, "response_len_mean": 10.0}  # 3x: no trip
    assert step_trips([*base, noisy], G) == []
    spike = {**noisy, "loss": 5.0}
    assert [t.signal for t in step_trips([*base, spike], G)] == ["loss"]
    assert step_trips([*base, {**noisy, "skipped": True, "loss": float("nan")}], G) == []
    # A horizon that moves is not a length collapse; a length that runs away from its horizon is.
    assert step_trips([*base, {**noisy, "horizon": 40, "response_len_mean": 40.0}], G) == []
    longer = [{**noisy, "step": 5 + i, "response_len_mean": 10.0, "horizon": 10, "cut_share": 1.0} for i in range(4)]
    base_cut = [{**r, "cut_share": 0.2} for r in base]
    assert "cut_share" in [t.signal for t in step_trips([*base_cut, *longer], G)]


def test_eval_metric_baseline_at_zero_and_noise() -> None:
    first = {"step": 8, "accuracy": 0.0, "cut_share": 0.3, "repeated_4gram_share": 0.4, "multi_box_share": 0.0}
    assert eval_trips([first, {**first, "step": 16, "accuracy": 0.0}], "accuracy", 40, G) == []
    cut = eval_trips([first, {**first, "step": 16, "cut_share": 0.8}], "accuracy", 40, G)
    assert [t.signal for t in cut] == ["eval_cut_share"]  # a metric at 0 does not hide the collapse
    good = {**first, "accuracy": 0.5}
    assert eval_trips([good, {**good, "accuracy": 0.4}], "accuracy", 40, G) == []  # within the noise
    assert [t.signal for t in eval_trips([good, {**good, "accuracy": 0.1}], "accuracy", 40, G)] == ["eval_accuracy"]


def test_periodic_eval_collapse_warning(tmp_path: Path) -> None:
    """The warning (never tested before): fires on the xfamily collapse at 0 accuracy, not on a 0.025 -> 0 wiggle."""
    evals = PeriodicEval(load_config("configs/smoke.yaml"), tmp_path)
    arms = json.loads((RESULTS / "xfamily.json").read_text())["arms"]
    base, at8 = arms["esr-100"]["evals"][:2]
    assert "eval_cut_share" in (evals._collapse(at8, [base]) or "")
    lr5 = json.loads((RESULTS / "xfamily-lr5e-5.json").read_text())["arms"]["full-512"]["evals"]
    assert evals._collapse(lr5[2], lr5[:2]) is None  # the old warning said "0.000 is far below its best 0.025"
    assert evals._collapse(at8, []) is None
