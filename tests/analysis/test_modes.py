"""Shared rollout scoring (checked against plain full-logits forwards), mode shares on hand-made top-k lists, and
run_modes end to end on a tiny run."""

import json
import math

import pytest
import torch

from esr.analysis import rollout_scores
from esr.analysis.modes import mode_shares, mode_stats, run_modes, top_share_mask
from esr.analysis.rollout_scores import AnalysisError, PairScores, check_same_tokenizer, score_rollouts
from esr.config import ConfigError, load_config, save_config
from esr.models import load_model
from esr.rollout.sampler import build_rollouts, left_pad
from esr.train import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("modes") / "run"
    overrides = ["train.steps=2", "train.checkpoint_every=1", "train.batch_size=2", "rollout.n=8",
                 "rollout.max_new_tokens=12"]
    train(load_config("configs/smoke.yaml", overrides), out, progress=False)
    return out


def test_score_rollouts_matches_full_logits():
    student, tok = load_model("tiny-student")
    teacher, _ = load_model("tiny-teacher")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 2000, (n,), generator=g).tolist() for n in (5, 9, 3)]  # left padding differs
    ids_B_P, mask_B_P = left_pad(prompts, tok.pad_token_id)
    new_B_R = torch.randint(10, 2000, (3, 11), generator=g)
    new_B_R[1, 4] = tok.eos_token_id  # row 1 ends after 5 tokens; its tail is padding
    ro = build_rollouts(ids_B_P, mask_B_P, new_B_R, [tok.eos_token_id], horizon=11)
    V = 49_000  # fewer columns than the models have: both sides must slice
    # Odd chunk and micro-batch sizes: the row slices and the position chunks must be stitched back exactly.
    scores = score_rollouts(student, teacher, ro, V, chunk=4, topk=5, micro_batch=2)

    P = ro.prompt_len
    pos_B_L = (ro.attention_mask_B_L.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = [m(input_ids=ro.input_ids_B_L, attention_mask=ro.attention_mask_B_L, position_ids=pos_B_L).logits
                  for m in (student, teacher)]
    logp_s, logp_t = (lg[:, P - 1 : -1, :V].double().log_softmax(-1) for lg in logits)
    kl_B_R = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    mask = ro.response_mask_B_R
    assert mask.sum() == 11 + 5 + 11 and scores.mask_B_R.equal(mask)
    assert torch.allclose(scores.kl_B_R[mask].double(), kl_B_R[mask], atol=1e-5, rtol=0)
    assert (scores.kl_B_R[~mask] == 0).all()
    for logp, ids_K, probs_K in ((logp_s, scores.student_topk_ids_B_R_K, scores.student_topk_probs_B_R_K),
                                 (logp_t, scores.teacher_topk_ids_B_R_K, scores.teacher_topk_probs_B_R_K)):
        top = torch.topk(logp.exp(), 5, dim=-1)
        assert ids_K[mask].equal(top.indices[mask])
        assert torch.allclose(probs_K[mask].double(), top.values[mask], atol=1e-6, rtol=0)
    assert torch.allclose(scores.student_top1_prob_B_R[mask].double(), logp_s.exp().amax(-1)[mask], atol=1e-6)
    assert scores.tokens_B_R.equal(ro.response_ids_B_R) and scores.lengths_B.tolist() == [11, 5, 11]


class _Vocab:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return self.vocab


def test_cross_tokenizer_pair_is_refused(monkeypatch):
    vocabs = {"a": {"x": 0, "y": 1}, "b": {"x": 0, "y": 2}, "c": {"x": 0, "y": 1, "<think>": 2}}
    monkeypatch.setattr(rollout_scores, "load_tokenizer", lambda spec: _Vocab(vocabs[spec]))
    with pytest.raises(ConfigError, match="'a' and teacher 'b' have different tokenizers.*same-tokenizer pairs only"):
        check_same_tokenizer("a", "b")
    check_same_tokenizer("a", "c")  # one id space that the teacher extends: fine


def test_mode_shares_on_hand_made_top_k():
    student_top1_N = torch.tensor([5, 7, 9, 1])
    teacher_topk_N_K = torch.tensor([
        [5, 1, 2, 3, 4],  # teacher's top-1                  -> top1_match
        [1, 2, 7, 3, 4],  # teacher's rank 3                 -> teacher_2_5
        [0, 1, 2, 3, 4],  # absent                           -> outside_top5
        [2, 3, 4, 6, 1],  # teacher's rank 5                 -> teacher_2_5
    ])
    assert mode_shares(student_top1_N, teacher_topk_N_K) == {"top1_match": 0.25, "teacher_2_5": 0.5,
                                                             "outside_top5": 0.25}
    # Only the first 5 teacher ranks count: id 8 at rank 6 is "outside".
    wide = torch.tensor([[0, 1, 2, 3, 4, 8]])
    assert mode_shares(torch.tensor([8]), wide)["outside_top5"] == 1.0
    assert all(math.isnan(v) for v in mode_shares(torch.tensor([], dtype=torch.long), wide[:0]).values())


def test_top_share_mask_picks_highest_valid_kl():
    kl_B_R = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 5.0]])
    mask_B_R = torch.tensor([[True, True, True], [True, True, False]])  # the 5.0 is padding
    # 5 valid tokens, share 0.3 -> ceil(1.5) = 2 tokens: 0.9 and 0.7.
    assert top_share_mask(kl_B_R, mask_B_R, 0.3).tolist() == [[False, True, False], [True, False, False]]
    assert top_share_mask(kl_B_R, mask_B_R, 1.0).equal(mask_B_R)
    with pytest.raises(ValueError):
        top_share_mask(kl_B_R, mask_B_R, 0.0)


def test_mode_stats_on_hand_made_scores():
    # One rollout of 4 tokens; the top 50 % by KL are positions 1 (KL 3) and 3 (KL 2).
    s_ids = torch.tensor([[[1, 0], [2, 0], [3, 0], [4, 0]]])
    t_ids = torch.tensor([[[1, 9], [8, 2], [3, 9], [7, 6]]])
    scores = PairScores(
        tokens_B_R=torch.zeros(1, 4, dtype=torch.long), mask_B_R=torch.ones(1, 4, dtype=torch.bool),
        kl_B_R=torch.tensor([[1.0, 3.0, 0.5, 2.0]]),
        student_topk_ids_B_R_K=s_ids, student_topk_probs_B_R_K=torch.tensor([[[0.9, 0], [0.6, 0], [0.5, 0], [0.2, 0]]]),
        teacher_topk_ids_B_R_K=t_ids, teacher_topk_probs_B_R_K=torch.zeros(1, 4, 2),
    )
    stats = mode_stats(scores, 0.5)
    assert stats["tokens"] == 2
    # Position 1: student's 2 is the teacher's rank 2; position 3: student's 4 is not in the teacher's list.
    assert (stats["top1_match"], stats["teacher_2_5"], stats["outside_top5"]) == (0.0, 0.5, 0.5)
    assert stats["student_top1_prob"] == pytest.approx((0.6 + 0.2) / 2)
    assert stats["mean_kl_top"] == pytest.approx(2.5) and stats["mean_kl_all"] == pytest.approx(6.5 / 4)


def test_run_modes_end_to_end(tiny_run, tmp_path):
    result = run_modes([tiny_run], tmp_path / "out", rollouts=3, max_new_tokens=10, top_share=0.2, progress=False)
    data = json.loads((tmp_path / "out" / "modes.json").read_text())
    md = (tmp_path / "out" / "modes.md").read_text()
    names = [r["name"] for r in data["rows"]]
    assert names == ["base student", "teacher", "run/step-000002"] == [r.name for r in result.rows]
    for row in data["rows"]:
        s = row["lengths"]
        assert 1 <= s["p10"] <= s["p50"] <= s["p90"] <= s["max"] <= 10 and 0 <= s["cut_share"] <= 1
        assert f"| {row['name']} |" in md
        if row["name"] == "teacher":
            assert row["modes"] is None
            continue
        m = row["modes"]
        assert m["top1_match"] + m["teacher_2_5"] + m["outside_top5"] == pytest.approx(1.0)
        assert 1 <= m["tokens"] <= 6 and 0 < m["student_top1_prob"] <= 1 and m["mean_kl_top"] >= m["mean_kl_all"]


def test_run_modes_refuses_runs_of_different_pairs(tiny_run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    save_config(load_config("configs/smoke.yaml", ["teacher.name=tiny-student"]), other / "config.yaml")
    with pytest.raises(AnalysisError, match="compare runs of one pair"):
        run_modes([tiny_run, other], tmp_path / "out", progress=False)


def test_run_modes_reuses_rows_of_an_earlier_result(tiny_run, tmp_path):
    out = tmp_path / "out"
    first = run_modes([tiny_run], out, rollouts=3, max_new_tokens=10, top_share=0.2, checkpoint=2, progress=False)
    # Another checkpoint of the run: base student and teacher come from the file, only the new row is sampled.
    second = run_modes([tiny_run], out, rollouts=3, max_new_tokens=10, top_share=0.2, checkpoint=1, progress=False)
    assert [r.name for r in second.rows] == ["base student", "teacher", "run/step-000001"]
    assert second.rows[:2] == first.rows[:2]
    assert "sample teacher" not in second.seconds and "sample base student" not in second.seconds
    assert "sample run/step-000001" in second.seconds
    # Other sampling (top_share): nothing is reused; reuse=False: nothing is reused either.
    third = run_modes([tiny_run], out, rollouts=3, max_new_tokens=10, top_share=0.5, checkpoint=1, progress=False)
    assert "sample teacher" in third.seconds and "sample base student" in third.seconds
    fresh = run_modes([tiny_run], out, rollouts=3, max_new_tokens=10, top_share=0.5, checkpoint=1, reuse=False,
                      progress=False)
    assert "sample run/step-000001" in fresh.seconds
    assert json.loads((out / "modes.json").read_text())["prompt_keys"] == fresh.prompt_keys
    assert len(fresh.prompt_keys) == 3
