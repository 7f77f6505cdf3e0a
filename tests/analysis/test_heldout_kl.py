"""esr probe heldout-kl (esr/analysis/heldout_kl.py): held-out KL of a tiny run's checkpoints and base student,
checked against an independent computation with the loss code; targets, output files, CLI errors; cross-tokenizer."""

import json
import math
import shutil

import pytest
import torch
import yaml

from esr.analysis.heldout_kl import run_heldout_kl, split_means
from esr.analysis.heldout_targets import resolve_targets
from esr.analysis.rollout_scores import AnalysisError
from esr.config import load_config
from esr.losses import reverse_kl
from esr.models import load_model
from esr.optim.probe import load_rollouts
from esr.train import train
from tests.esr_process import assert_user_error, run_esr

SMALL = ["train.steps=2", "train.checkpoint_every=1", "train.batch_size=2", "rollout.n=6", "rollout.max_new_tokens=12"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout") / "run"
    train(load_config("configs/smoke.yaml", SMALL), out, progress=False)
    return out


@pytest.fixture(scope="module")
def measured(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout-out")
    targets = resolve_targets([str(tiny_run)], base=True)
    return run_heldout_kl(targets, out, prompts=3, max_new_tokens=10, progress=False), out


def test_split_means_per_row():
    kl_B_R = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 7.0, 0.0, 0.0]])
    mask_B_R = torch.tensor([[True, True, True, False], [True, True, False, False]])
    means = split_means(kl_B_R, mask_B_R, split=2)
    assert means["inside"] == [1.5, 6.0]
    assert means["beyond"] == [3.0, None]  # the second rollout ended before position 2
    assert means["all"] == [2.0, 6.0]


def _independent_kl(spec, teacher, rollouts, split):
    """Per rollout: the loss code's reverse KL on whole-sequence logits of each unpadded row, then plain means."""
    student, _ = load_model(spec)
    vocab = min(student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
    out = {"inside": [], "beyond": [], "all": []}
    P = rollouts.prompt_len
    with torch.no_grad():
        for b in range(len(rollouts)):
            prompt = rollouts.input_ids_B_L[b, :P][rollouts.attention_mask_B_L[b, :P].bool()]
            n = int(rollouts.lengths_B[b])
            ids = torch.cat([prompt, rollouts.response_ids_B_R[b, :n]])[None]
            at = slice(len(prompt) - 1, len(prompt) - 1 + n)
            kl = reverse_kl(student(ids).logits[0, at, :vocab], teacher(ids).logits[0, at, :vocab]).double()
            for name, part in (("inside", kl[:split]), ("beyond", kl[split:]), ("all", kl)):
                out[name].append(float(part.mean()) if len(part) else None)
    return out


def test_kl_equals_an_independent_computation_on_the_same_rollouts(measured):
    summary, out = measured
    s = summary["settings"]
    assert (s["prompts"], s["max_new_tokens"], s["split"]) == (3, 10, 6)
    teacher, _ = load_model("tiny-teacher")
    for t in summary["targets"]:
        rollouts = load_rollouts(out / "rollouts" / f"{t['label']}.safetensors")
        assert t["lengths"] == rollouts.lengths_B.tolist() and t["tokens"] == t["lengths"]
        expected = _independent_kl(t["spec"], teacher, rollouts, split=6)
        for name in ("inside", "beyond", "all"):
            for got, want in zip(t["per_prompt"][name], expected[name], strict=True):
                assert (got is None) == (want is None)
                if want is not None:
                    assert got == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_summary_files_and_comparisons(measured, tiny_run):
    summary, out = measured
    labels = [t["label"] for t in summary["targets"]]
    assert labels == ["run@base", "run@step-000002"] and summary["reference"] == "run@base"
    assert len(summary["settings"]["prompt_ids"]) == 3
    assert all(i.startswith("gsm_symbolic:") for i in summary["settings"]["prompt_ids"])
    base, trained = summary["targets"]
    assert base["spec"] == "tiny-student" and trained["spec"].endswith("step-000002")
    assert base["against_first"] is None
    for t in summary["targets"]:
        for name, iv in t["intervals"].items():
            values = [v for v in t["per_prompt"][name] if v is not None]
            assert iv["n"] == len(values) and iv["mean"] == pytest.approx(sum(values) / len(values))
            assert iv["low"] <= iv["mean"] <= iv["high"]
    diff = trained["against_first"]["all"]
    assert diff["mean"] == pytest.approx(trained["intervals"]["all"]["mean"] - base["intervals"]["all"]["mean"])
    assert diff["verdict"] in ("lower", "higher", "not distinguishable")
    assert json.loads((out / "heldout_kl.json").read_text()) == summary
    md = (out / "heldout_kl.md").read_text()
    assert "| run@step-000002 |" in md and "Paired difference against run@base" in md


def test_targets(tiny_run, tmp_path):
    assert [t.label for t in resolve_targets([f"{tiny_run}@step-1", f"{tiny_run}@2", f"{tiny_run}@base"])] == [
        "run@step-000001", "run@step-000002", "run@base"]
    stepped = resolve_targets([str(tiny_run)], steps=[1, 2], base=True)
    assert [t.label for t in stepped] == ["run@base", "run@step-000001", "run@step-000002"]
    assert stepped[0].checkpoint is None and stepped[0].spec == "tiny-student"
    with pytest.raises(AnalysisError, match="step-000001, step-000002"):
        resolve_targets([f"{tiny_run}@step-7"])
    with pytest.raises(AnalysisError, match="no config.yaml"):
        resolve_targets([str(tmp_path)])


def _copy_config(tiny_run, folder, **teacher):
    folder.mkdir()
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    cfg["teacher"].update(teacher)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    return folder


def test_cli_errors(tiny_run, tmp_path):
    """One line each, exit code 2: a run without checkpoints, runs of different teachers."""
    empty = _copy_config(tiny_run, tmp_path / "empty")
    assert_user_error(run_esr("probe", "heldout-kl", empty, "--no-progress"), "no checkpoint", str(empty))
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    _copy_config(tiny_run, tmp_path / "x", name="tiny-teacher-qwen")
    shutil.copy(tmp_path / "x" / "config.yaml", other / "config.yaml")
    with pytest.raises(AnalysisError, match="teacher 'tiny-teacher-qwen'"):
        resolve_targets([str(tiny_run), str(other)])


def test_cross_tokenizer_pair(tmp_path):
    """Student and teacher with different tokenizers: only the 1:1-aligned tokens count, and the values are real
    reverse KLs."""
    run = tmp_path / "xrun"
    train(load_config("configs/smoke.yaml", [*SMALL, "train.steps=1", "teacher.name=tiny-teacher-qwen",
                                             "loss.cross_tokenizer=aligned-exact"]), run, progress=False)
    summary = run_heldout_kl(resolve_targets([str(run)], base=True), tmp_path / "out", prompts=2, progress=False)
    assert summary["settings"]["teacher"] == "tiny-teacher-qwen"
    for t in summary["targets"]:
        assert all(0 < k <= n for k, n in zip(t["tokens"], t["lengths"], strict=True))
        assert any(k < n for k, n in zip(t["tokens"], t["lengths"], strict=True))  # some tokens are not 1:1
        assert all(v is not None and math.isfinite(v) and v >= 0 for v in t["per_prompt"]["all"])
