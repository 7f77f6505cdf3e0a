"""Token analysis: categories of hand-picked tokens, position-range and category aggregation on hand data, and
run_token_analysis end to end (a model spec pair, and a trained run folder)."""

import json
import math

import pytest
import torch

from esr.analysis.tokens import category_means, position_range_means, run_token_analysis, token_category, top_tokens
from esr.config import load_config
from esr.train import train

EXPECTED = {
    # planning: whole words, any case, leading space markers stripped
    "First": "planning", " Let": "planning", "\u0120So": "planning", " therefore": "planning", "Now": "planning",
    " next": "planning", " We": "planning", " need": "planning", " Wait": "planning", "\u2581Step": "planning",
    " Let's": "planning",
    # structural: whitespace, markdown, punctuation
    "\n": "structural", "\n\n": "structural", "   ": "structural", "**": "structural", " ###": "structural",
    "---": "structural", "```": "structural", ".": "structural", ",": "structural", " (": "structural",
    "):\n": "structural", "%": "structural",
    # numbers
    "7": "number", " 42": "number", "3.14": "number", "1,000": "number",
    # operators (a lone "-" is minus; "--" is markdown above)
    " +": "operator", "-": "operator", " *": "operator", "/": "operator", " =": "operator", "<=": "operator",
    ">": "operator", "^": "operator", "×": "operator",
    # LaTeX
    "\\frac": "latex", " \\boxed": "latex", "{": "latex", "}}": "latex", "$": "latex", "\\(": "latex",
    # special markers
    "<|im_end|>": "special", "</s>": "special",
    # everything else
    " apples": "continuation", "ing": "continuation", "x": "continuation",
    " Sofia": "continuation", "5.": "continuation", "km": "continuation", "Letter": "continuation",
}


@pytest.mark.parametrize("text", list(EXPECTED))
def test_token_category(text):
    assert token_category(text) == EXPECTED[text]


def test_position_range_means_on_hand_data():
    R = 22
    kl_B_R = torch.stack([torch.arange(R, dtype=torch.float32), 100 + torch.arange(R, dtype=torch.float32)])
    mask_B_R = torch.stack([torch.ones(R, dtype=torch.bool), torch.arange(R) < 6])  # row 1 ends after 6 tokens
    rows = {r["range"]: r for r in position_range_means(kl_B_R, mask_B_R)}
    assert list(rows) == ["0-4", "5-19", "20-49", "50-99", "100-199", "200-499", "500+"]
    assert rows["0-4"]["tokens"] == 10 and rows["0-4"]["mean_kl"] == pytest.approx((0 + 1 + 2 + 3 + 4 + 510) / 10)
    # 5..19 of row 0 (sum 180) and position 5 of row 1 (105): token-weighted, 16 tokens.
    assert rows["5-19"]["tokens"] == 16 and rows["5-19"]["mean_kl"] == pytest.approx(285 / 16)
    assert rows["20-49"]["tokens"] == 2 and rows["20-49"]["mean_kl"] == pytest.approx(20.5)
    assert rows["50-99"]["tokens"] == 0 and math.isnan(rows["50-99"]["mean_kl"])
    custom = position_range_means(kl_B_R, mask_B_R, bins=((0, 2), (2, None)))
    assert [(r["range"], r["tokens"]) for r in custom] == [("0-1", 4), ("2+", 24)]


def test_category_means_and_top_tokens_on_hand_data():
    texts = [" So", " So", " So", "7", "7", "7", "\n", " apples"]
    kls = [1.0, 2.0, 3.0, 0.5, 0.5, 0.5, 4.0, 0.0]
    rows = {r["category"]: r for r in category_means([token_category(t) for t in texts], kls)}
    assert rows["planning"]["tokens"] == 3 and rows["planning"]["mean_kl"] == pytest.approx(2.0)
    assert rows["planning"]["share_kl"] == pytest.approx(6.0 / 11.5) and rows["planning"]["share_tokens"] == 3 / 8
    assert rows["number"]["mean_kl"] == pytest.approx(0.5) and rows["structural"]["mean_kl"] == pytest.approx(4.0)
    assert rows["latex"]["tokens"] == 0 and math.isnan(rows["latex"]["mean_kl"])
    # "\n" has the highest KL but is seen once: below min_count 3 it is left out.
    top = top_tokens(texts, kls, top=5, min_count=3)
    assert [(r["token"], r["count"], r["category"]) for r in top] == [(" So", 3, "planning"), ("7", 3, "number")]
    assert top[0]["mean_kl"] == pytest.approx(2.0)
    assert [r["token"] for r in top_tokens(texts, kls, top=1, min_count=1)] == ["\n"]


def _check_outputs(out, result, student):
    data = json.loads((out / "tokens.json").read_text())
    assert (out / "tokens.png").read_bytes()[:4] == b"\x89PNG" and "| category |" in (out / "tokens.md").read_text()
    assert data["student"] == student and data["tokens"] == result.tokens > 0
    assert sum(r["tokens"] for r in data["categories"]) == data["tokens"]
    assert sum(r["tokens"] for r in data["positions"]) == data["tokens"]
    used = [r for r in data["categories"] if r["tokens"]]
    assert sum(r["share_kl"] for r in used) == pytest.approx(1.0)
    # The overall mean is the token-weighted mean of the category means.
    assert sum(r["mean_kl"] * r["tokens"] for r in used) / data["tokens"] == pytest.approx(data["mean_kl"], rel=1e-6)
    assert all(r["count"] >= 3 for r in data["top_tokens"])
    assert [r["mean_kl"] for r in data["top_tokens"]] == sorted((r["mean_kl"] for r in data["top_tokens"]),
                                                                reverse=True)


def test_run_token_analysis_on_a_model_spec(tmp_path):
    result = run_token_analysis("tiny-student", tmp_path, teacher="tiny-teacher", rollouts=3, max_new_tokens=10,
                                progress=False)
    _check_outputs(tmp_path, result, "tiny-student")
    assert result.teacher == "tiny-teacher" and result.tokens <= 30


def test_run_token_analysis_on_a_run_folder(tmp_path):
    run = tmp_path / "run"
    overrides = ["train.steps=1", "train.batch_size=2", "rollout.n=8", "rollout.max_new_tokens=12"]
    train(load_config("configs/smoke.yaml", overrides), run, progress=False)
    result = run_token_analysis(run, tmp_path / "out", rollouts=3, max_new_tokens=10, progress=False)
    _check_outputs(tmp_path / "out", result, str(run / "checkpoints" / "step-000001"))
