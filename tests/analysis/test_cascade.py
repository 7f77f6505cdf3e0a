"""Cascade analysis: per-position means and KL drops on hand-made curves, and one real run end to end."""

import json
import math

import pytest
import torch

from esr.analysis.cascade import kl_drop, kl_drop_tokens, per_position_mean, range_means, run_cascade, trained_window
from esr.analysis.rollout_scores import AnalysisError, heldout_prompts, resolve_checkpoint
from esr.config import load_config
from esr.models.load import load_tokenizer
from esr.train import train
from esr.train.session import batch_indices

NAN = math.nan


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cascade") / "run"
    overrides = ["train.steps=2", "train.checkpoint_every=1", "train.batch_size=2", "rollout.n=8",
                 "rollout.max_new_tokens=12"]
    train(load_config("configs/smoke.yaml", overrides), out, progress=False)
    return out


def test_per_position_mean_averages_alive_rollouts_only():
    kl_B_R = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 99.0]])
    mask_B_R = torch.tensor([[True, True, True], [True, True, False]])
    mean_R, alive_R = per_position_mean(kl_B_R, mask_B_R, length=5)
    assert alive_R.tolist() == [2, 2, 1, 0, 0]
    assert mean_R[:3].tolist() == [2.0, 3.0, 3.0]  # the masked 99 never counts
    assert mean_R[3:].isnan().all()
    short_R, _ = per_position_mean(kl_B_R, mask_B_R, length=2)  # truncated to the requested length
    assert short_R.tolist() == [2.0, 3.0]


def test_kl_drop_weighs_every_defined_position_equally():
    before = torch.tensor([1.0, 1.0, 2.0, 2.0, NAN, 4.0])
    after = torch.tensor([0.5, 0.5, 1.5, 1.5, 1.0, NAN])
    # Window [0, 2): means 1.0 -> 0.5 = 50 % drop.
    assert kl_drop(before, after, 0, 2) == pytest.approx(50.0)
    # Beyond [2, 6): positions 4 and 5 lack one curve, so only 2 and 3 count: 2.0 -> 1.5 = 25 %.
    assert range_means(before, after, 2, 6) == pytest.approx((2.0, 1.5))
    assert kl_drop(before, after, 2, 6) == pytest.approx(25.0)
    # A rise is a negative drop; equal weighting: (1 + 3) / 2 = 2 before, (2 + 3) / 2 = 2.5 after -> -25 %.
    assert kl_drop(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 3.0]), 0, 2) == pytest.approx(-25.0)
    assert math.isnan(kl_drop(before, after, 4, 6))  # no position with both curves
    assert math.isnan(kl_drop(torch.zeros(3), torch.zeros(3), 0, 3))  # 0 before: undefined, not a division error


def test_token_weighted_drop_weighs_positions_by_alive_rollouts():
    before, alive_b = torch.tensor([1.0, 4.0, NAN]), torch.tensor([3, 1, 0])
    after, alive_a = torch.tensor([1.0, 1.0, 7.0]), torch.tensor([1, 1, 2])
    # before: (3 * 1 + 1 * 4) / 4 = 1.75; after: (1 + 1 + 2 * 7) / 4 = 4 -> 100 * (1 - 4 / 1.75)
    assert kl_drop_tokens(before, alive_b, after, alive_a, 0, 3) == pytest.approx(100 * (1 - 4 / 1.75))
    # [0, 2): before 1.75, after 1.0 -> 42.857 %; equal weighting would give 1 - 1 / 2.5 = 60 %.
    assert kl_drop_tokens(before, alive_b, after, alive_a, 0, 2) == pytest.approx(100 * (1 - 1 / 1.75))
    assert kl_drop(before, after, 0, 2) == pytest.approx(60.0)
    assert math.isnan(kl_drop_tokens(before, alive_b, after, alive_a, 2, 3))  # no token before


def test_trained_window_needs_n_unless_esr():
    assert trained_window("esr", 100, None) == 100
    assert trained_window("full", 100, 64) == 64
    with pytest.raises(AnalysisError, match="pass n"):
        trained_window("full", 100, None)


def test_resolve_checkpoint(tiny_run):
    assert resolve_checkpoint(tiny_run).name == "step-000002"
    assert resolve_checkpoint(tiny_run, 1).name == "step-000001"
    assert resolve_checkpoint(tiny_run, "step-000001").name == "step-000001"
    with pytest.raises(AnalysisError, match="step-000001, step-000002"):
        resolve_checkpoint(tiny_run, 7)


def test_run_cascade_end_to_end(tiny_run):
    result = run_cascade(tiny_run, rollouts=3, max_new_tokens=14, progress=False)
    out = tiny_run / "analysis"  # the default out_dir
    data = json.loads((out / "cascade.json").read_text())
    assert (out / "cascade.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["n"] == 8 and data["checkpoint"] == "step-000002" and data["max_new_tokens"] == 14
    assert len(data["before"]) == len(data["after"]) == 14
    assert data["alive_before"][0] == data["alive_after"][0] == 3
    for curve, alive in ((data["before"], data["alive_before"]), (data["after"], data["alive_after"])):
        assert all((v is None) == (a == 0) for v, a in zip(curve, alive, strict=True))
        assert all(v is None or v >= 0 for v in curve)
    # The reported drops follow from the reported curves (equal weight per position with both defined).
    for lo, hi, key in ((0, 8, "drop_in_pct"), (8, 14, "drop_beyond_pct")):
        pairs = [(b, a) for b, a in zip(data["before"][lo:hi], data["after"][lo:hi], strict=True) if None not in (b, a)]
        expected = 100 * (1 - sum(a for _, a in pairs) / sum(b for b, _ in pairs))
        assert data[key] == pytest.approx(expected, rel=1e-6)
    for lo, hi, key in ((0, 8, "drop_in_pct_tokens"), (8, 14, "drop_beyond_pct_tokens")):
        weighted = [sum(v * a for v, a in zip(c[lo:hi], n[lo:hi], strict=True) if v is not None) / sum(n[lo:hi])
                    for c, n in ((data["before"], data["alive_before"]), (data["after"], data["alive_after"]))]
        assert data[key] == pytest.approx(100 * (1 - weighted[1] / weighted[0]), rel=1e-6)
    assert result.drop_in_pct == pytest.approx(data["drop_in_pct"])
    assert "gsm_symbolic generator seed" in data["prompts"]


def test_heldout_prompts_of_a_file_source_skip_what_training_drew(tmp_path):
    rows = [json.dumps({"prompt": f"question number {i}"}) for i in range(10)]
    (tmp_path / "p.jsonl").write_text("\n".join(rows) + "\n")
    cfg = load_config("configs/smoke.yaml", ["data.source=jsonl", f"data.path={tmp_path / 'p.jsonl'}",
                                             "train.steps=2", "train.batch_size=3", "seed=5"])
    drawn = {i for step in range(2) for i in batch_indices(10, 3, step, 5)}
    assert len(drawn) == 6
    tok = load_tokenizer("tiny-student")
    held = heldout_prompts(cfg, tok, 3)
    never = [i for i in range(10) if i not in drawn]  # 4 prompts training never saw; the last 3 of them
    assert held.ids == tuple(f"p.jsonl:{i + 1}" for i in never[-3:])
    assert "never drawn" in held.how
    topped_up = heldout_prompts(cfg, tok, 6)  # only 4 unseen: the last 2 drawn ones fill up, in source order
    expected = sorted(never + sorted(drawn)[-2:])
    assert topped_up.ids == tuple(f"p.jsonl:{i + 1}" for i in expected)
    gsm = heldout_prompts(load_config("configs/smoke.yaml"), tok, 2)
    assert gsm.ids == ("gsm_symbolic:1000003:0", "gsm_symbolic:1000003:1")
