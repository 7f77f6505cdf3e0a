"""KL profile: the pure statistics on hand data, the per-token values against a plain full-logits computation on the
same rollouts, the files written, and the refusal of cross-tokenizer pairs."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from esr.analysis.kl_profile import (
    bucket_stats,
    cumulative_share,
    kl_profile,
    kl_profile_session,
    position_stats,
    profile_summary,
    recommend_n,
    run_kl_profile,
    summarize_profile,
    top_k_share,
)
from esr.config import ConfigError
from esr.models import load_model
from esr.models.pair import require_shared_vocabulary


def test_cumulative_share_and_recommended_n_on_a_hand_vector():
    # m = [4, 3, 2, 1], total 10: C = [0.4, 0.7, 0.9, 1.0]
    c = cumulative_share([4.0, 3.0, 2.0, 1.0])
    np.testing.assert_allclose(c, [0.4, 0.7, 0.9, 1.0])
    assert recommend_n(c, 0.45) == 2  # 0.4 < 0.45 <= 0.7: the first two tokens hold 45% of the KL
    assert recommend_n(c, 0.40) == 1  # reaching the share exactly counts
    assert recommend_n(c, 0.70) == 2
    assert recommend_n(c, 0.95) == 4
    assert recommend_n(c, 1.0) == 4
    np.testing.assert_allclose(cumulative_share([math.nan, 2.0, 2.0]), [0.0, 0.5, 1.0])  # no rollout alive: 0
    assert not cumulative_share([0.0, 0.0]).any()
    assert recommend_n(cumulative_share([0.0, 0.0]), 0.45) is None
    with pytest.raises(ValueError, match="share"):
        recommend_n(c, 0.0)


def test_position_and_bucket_stats_on_hand_data():
    values = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 99.0]])
    mask = np.array([[True, True, True], [True, True, False]])  # row 2 ended after 2 tokens: 99 is not counted
    ps = position_stats(values, mask)
    np.testing.assert_allclose(ps.mean_T, [2.0, 3.0, 3.0])
    np.testing.assert_allclose(ps.std_T, [1.0, 1.0, 0.0])  # population std: {1, 3} -> 1
    np.testing.assert_allclose(ps.p25_T, [1.5, 2.5, 3.0])
    np.testing.assert_allclose(ps.p75_T, [2.5, 3.5, 3.0])
    assert ps.alive_T.tolist() == [2, 2, 1]
    b1, b2 = bucket_stats(values, mask, bucket=2)
    # positions 1-2 pool {1, 2, 3, 4}: mean 2.5, std sqrt(1.25), p25 1.75, p75 3.25
    assert (b1.start, b1.stop, b1.tokens, b1.alive) == (1, 2, 4, 2)
    assert b1.mean == pytest.approx(2.5) and b1.std == pytest.approx(math.sqrt(1.25))
    assert (b1.p25, b1.p75) == (pytest.approx(1.75), pytest.approx(3.25))
    assert (b2.start, b2.stop, b2.tokens, b2.alive, b2.mean, b2.std) == (3, 3, 1, 1, 3.0, 0.0)
    # per-rollout means in bucket 1: row 1 (1 + 2) / 2 = 1.5, row 2 (3 + 4) / 2 = 3.5 -> quartiles 2.0 and 3.0
    assert (b1.rollout_p25, b1.rollout_p75) == (pytest.approx(2.0), pytest.approx(3.0))
    assert (b2.rollout_p25, b2.rollout_p75) == (3.0, 3.0)  # only row 1 is alive at position 3


def test_summary_uses_the_mean_over_alive_rollouts_and_reports_the_mass_variant():
    kl = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    values = {"kl": kl, "student_entropy": kl * 2, "teacher_entropy": kl * 3}
    p = summarize_profile(values, mask, share=0.45, bucket=2)
    np.testing.assert_allclose(p.positions["kl"].mean_T, [4.0, 3.0, 2.0, 1.0])
    assert p.recommended_n_position == 2  # C from the means [4, 3, 2, 1]: 0.4 < 0.45 <= 0.7
    np.testing.assert_allclose(p.cumulative_mass_T, [8 / 14, 11 / 14, 13 / 14, 1.0])  # sums [8, 3, 2, 1]
    assert p.recommended_n == 1  # the token-mass rule: 8 / 14 >= 0.45 at the first position
    assert p.buckets["teacher_entropy"][0].mean == pytest.approx((12 + 9 + 12) / 3)


def test_top_k_share_on_hand_data():
    # Row 1: alive KL [4, 3, 2, 1] (total 10), top 2 = 7 -> 0.7 of its KL, 2 of 4 tokens. Row 2: one alive token
    # (the masked 9 never counts), all of its KL with k >= 1. Row 3: nothing alive: no share, no tokens.
    kl = torch.tensor([[4.0, 3.0, 2.0, 1.0], [5.0, 9.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, False, False, False], [False] * 4])
    top = top_k_share(kl, mask, 2)
    assert top["mean"] == pytest.approx((0.7 + 1.0) / 2) and top["pooled"] == pytest.approx((7 + 5) / 15)
    assert top["tokens"] == pytest.approx((2 / 4 + 1.0) / 2)
    assert top_k_share(kl, mask, 10)["mean"] == pytest.approx(1.0)  # k past the width: everything
    summary = profile_summary(summarize_profile({"kl": kl, "student_entropy": kl, "teacher_entropy": kl}, mask,
                                                share=0.45, bucket=2))
    assert [t["k"] for t in summary["top_k_kl_share"]] == [50, 100, 200]


@pytest.fixture(scope="module")
def tiny_pair():
    student, tok = load_model("tiny-student")
    teacher, _ = load_model("tiny-teacher")
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ["What is 2 + 3?", "Name a colour please.", "x"]]
    return student, teacher, tok, prompts


def reference_values(student, teacher, prompt, response):
    """Unpadded prompt + response through plain model(...).logits; float64 KL(p_s||p_t), H_s, H_t per response token."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        s, t = student(ids).logits[0].double(), teacher(ids).logits[0].double()
    V = min(s.shape[-1], t.shape[-1])
    P = len(prompt)
    ls = torch.log_softmax(s[P - 1 : P - 1 + len(response), :V], -1)
    lt = torch.log_softmax(t[P - 1 : P - 1 + len(response), :V], -1)
    kl = (ls.exp() * (ls - lt)).sum(-1)
    return kl, -(ls.exp() * ls).sum(-1), -(lt.exp() * lt).sum(-1)


def test_per_position_kl_equals_a_full_logits_computation(tiny_pair):
    student, teacher, tok, prompts = tiny_pair
    # 5 rollouts in batches of 3 (two batches of different widths), chunks of 5 positions (not dividing R)
    p = kl_profile(student, teacher, tok, prompts, rollouts=5, max_new_tokens=12, temperature=1.0, batch_size=3,
                   chunk_size=5, bucket=4, seed=7)
    assert len(p.rollouts) == 2 and p.values_B_R["kl"].shape[0] == 5
    rows = [(r, b) for r in p.rollouts for b in range(len(r))]
    ref = {q: torch.zeros(p.mask_B_R.shape, dtype=torch.float64) for q in ("kl", "student_entropy", "teacher_entropy")}
    for i, (r, b) in enumerate(rows):
        prompt = r.input_ids_B_L[b, : r.prompt_len][r.attention_mask_B_L[b, : r.prompt_len].bool()].tolist()
        assert prompt == list(prompts[i % len(prompts)])  # prompts taken in order, cycled
        n = int(r.lengths_B[b])
        assert p.mask_B_R[i].sum() == n and p.mask_B_R[i, :n].all()
        kl, hs, ht = reference_values(student, teacher, prompt, r.response_ids_B_R[b, :n].tolist())
        ref["kl"][i, :n], ref["student_entropy"][i, :n], ref["teacher_entropy"][i, :n] = kl, hs, ht
    for q, want in ref.items():
        torch.testing.assert_close(p.values_B_R[q].double(), want, atol=1e-5, rtol=0)
    assert ref["kl"].sum() > 0.1  # the two random models do disagree: the comparison is not 0 == 0
    mask = p.mask_B_R.double()
    want_mean = (ref["kl"] * mask).sum(0) / mask.sum(0)
    np.testing.assert_allclose(p.positions["kl"].mean_T, want_mean.numpy(), atol=1e-5)
    assert p.recommended_n_position == recommend_n(np.cumsum(want_mean.numpy()) / want_mean.sum().item(), 0.45)
    want_mass = (ref["kl"] * mask).sum(0).numpy()
    assert p.recommended_n == recommend_n(np.cumsum(want_mass) / want_mass.sum(), 0.45)


def test_run_kl_profile_writes_json_csv_and_png(tmp_path):
    p = run_kl_profile("configs/smoke.yaml", tmp_path, rollouts=3, max_new_tokens=10, progress=False)
    summary = json.loads((tmp_path / "kl_profile.json").read_text())
    assert summary["recommended_n"] == p.recommended_n is not None
    assert summary["rule"] == "token-mass" and "summed over the rollouts alive" in summary["rule_text"]
    assert summary["recommended_n_position"] == p.recommended_n_position is not None
    assert summary["settings"]["student"] == "tiny-student" and summary["settings"]["rollouts"] == 3
    with open(tmp_path / "kl_profile.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == p.mask_B_R.shape[1] and rows[0]["position"] == "1"
    kl_mean = [float(r["kl_mean"]) for r in rows]
    assert recommend_n(cumulative_share(kl_mean), 0.45) == p.recommended_n_position
    mass = [float(r["cumulative_kl_mass"]) for r in rows]
    assert recommend_n(mass, 0.45) == p.recommended_n
    assert (tmp_path / "kl_profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cross_tokenizer_pairs_are_refused(monkeypatch, tmp_path):
    one, other = SimpleNamespace(get_vocab=lambda: {"a": 0, "b": 1}), SimpleNamespace(get_vocab=lambda: {"a": 1})
    require_shared_vocabulary(one, one, "s", "t", "kl-profile")  # same ids: fine
    with pytest.raises(ConfigError, match="kl-profile needs a shared vocabulary"):
        require_shared_vocabulary(one, other, "s", "t", "kl-profile")
    monkeypatch.setattr("esr.models.pair.load_tokenizer", lambda name, *a: one if name == "tiny-student" else other)
    with pytest.raises(ConfigError, match="shared vocabulary.*'tiny-teacher'"):
        run_kl_profile("configs/smoke.yaml", tmp_path, rollouts=1, max_new_tokens=2, progress=False)
    with pytest.raises(ConfigError, match="shared vocabulary"):
        kl_profile_session(SimpleNamespace(cross=object()))
    assert not list(tmp_path.iterdir())
