"""End-to-end runs of `esr train` on the tiny smoke models: files, sane loss, resume, failure modes."""

import json

import pytest
import torch
from crash_resume import crash_and_resume, same_adapter
from safetensors.torch import load_file

import esr.train.run_step as step_module
from esr.cli import main
from esr.config import load_config
from esr.teacher.score import LocalScorer
from esr.train import NonFiniteLossError, RunFolderError, resume, train

SMOKE = "configs/smoke.yaml"


def test_cli_smoke_run_writes_a_complete_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", SMOKE, "train.steps=3", "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["loss"] == pytest.approx(r["kl"], rel=1e-5)  # reverse-KL loss: the loss IS the mean KL
        assert r["kl"] > 0 and torch.isfinite(torch.tensor(r["loss"]))
        assert 1 <= r["response_len_max"] <= r["horizon"] == 16
        assert r["tokens_scored"] == r["tokens_generated"] > 0
        assert r["seconds_generate"] > 0 and r["seconds_score"] > 0 and r["seconds_train"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    ckpt = out / "checkpoints" / "step-000003"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "config.yaml").is_file()
    assert json.loads((ckpt / "trainer" / "trainer_state.json").read_text())["step"] == 3
    assert load_config(out / "config.yaml").train.steps == 3
    assert "mean KL, first" in capsys.readouterr().err


def test_checkpoint_loads_with_peft(tmp_path):
    from esr.models import load_model

    result = train(load_config(SMOKE, ["train.steps=2"]), tmp_path / "r", progress=False)
    model, _ = load_model(str(result.last_checkpoint))
    assert type(model).__name__ == "PeftModelForCausalLM"
    saved = load_file(result.last_checkpoint / "adapter_model.safetensors")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(saved) == len(loaded) > 0


def test_full_finetune_lowers_kl(tmp_path):
    """On fixed tiny models the student must move toward the teacher: KL of the last steps < the first steps."""
    cfg = load_config(SMOKE, ["train.steps=10", "train.finetune=full", "train.lr=3e-3", "train.checkpoint_every=100"])
    rows = train(cfg, tmp_path / "r", progress=False).metrics
    first = sum(r["kl"] for r in rows[:3]) / 3
    last = sum(r["kl"] for r in rows[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    assert (tmp_path / "r" / "checkpoints" / "step-000010" / "model.safetensors").is_file()


VOLATILE = {"seconds_align", "seconds_generate", "seconds_score", "seconds_train", "peak_mem_gb"}


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_resume_after_crash_reaches_the_same_weights(tmp_path, monkeypatch, finetune):
    overrides = ["train.steps=4", "train.checkpoint_every=2", f"train.finetune={finetune}"]
    whole = train(load_config(SMOKE, overrides), tmp_path / "whole", progress=False)

    calls = {"n": 0}
    real = step_module.distill_micro_batch

    def crash_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # micro-batches 1-4 are steps 1-2 (2 each); the 5th is inside step 3
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "distill_micro_batch", crash_in_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(load_config(SMOKE, overrides), tmp_path / "crashed", progress=False)
    monkeypatch.setattr(step_module, "distill_micro_batch", real)
    assert len((tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()) == 2

    resumed = resume(tmp_path / "crashed", progress=False)
    assert _stable(resumed.metrics) == _stable(whole.metrics)
    name = "adapter_model.safetensors" if finetune == "lora" else "model.safetensors"
    a = load_file(whole.last_checkpoint / name)
    b = load_file(resumed.last_checkpoint / name)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_metrics_after_checkpoint_are_dropped_on_resume(tmp_path):
    cfg = load_config(SMOKE, ["train.steps=3", "train.checkpoint_every=2"])
    run = tmp_path / "r"
    train(cfg, run, progress=False)
    # Simulate a crash after step 3 was logged but before its checkpoint landed (plus a torn line).
    import shutil
    shutil.rmtree(run / "checkpoints" / "step-000003")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    rows = resume(run, progress=False).metrics
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_non_finite_teacher_stops_the_run_with_a_message(tmp_path, monkeypatch):
    nan_logits = lambda self, h: torch.full((*h.shape[:2], self.vocab_size), float("nan"))
    monkeypatch.setattr(LocalScorer, "logits", nan_logits)
    cfg = load_config(SMOKE, ["train.steps=5", "train.max_nonfinite=2"])
    with pytest.raises(NonFiniteLossError, match="2 steps in a row had a non-finite loss"):
        train(cfg, tmp_path / "r", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [True, True]


def test_existing_run_folder_needs_resume(tmp_path):
    cfg = load_config(SMOKE, ["train.steps=1"])
    train(cfg, tmp_path / "r", progress=False)
    with pytest.raises(RunFolderError, match="esr train --resume"):
        train(cfg, tmp_path / "r", progress=False)


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    assert main(["train", SMOKE, "train.stepz=3", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.stepz'" in err and "Did you mean 'train.steps'" in err
    assert "Traceback" not in err


def test_resume_with_random_n_selection_is_bit_exact(tmp_path, monkeypatch):
    """random-n draws from a generator seeded by the step, so a resumed run selects (and learns) the same."""
    overrides = ["train.steps=4", "train.checkpoint_every=2", "loss.select=random-n", "loss.select_n=5",
                 "loss.position_gamma=0.5"]
    whole = train(load_config(SMOKE, overrides), tmp_path / "whole", progress=False)
    assert all(r["tokens_scored"] <= 5 * 4 for r in whole.metrics)

    resumed = crash_and_resume(monkeypatch, load_config(SMOKE, overrides), tmp_path / "crashed")  # inside step 3
    assert _stable(resumed.metrics) == _stable(whole.metrics)
    assert same_adapter(whole, resumed)


@pytest.mark.parametrize(("select", "selection_forward"),
                         [("all", False), ("top-kl-n", True), ("top-teacher-entropy-n", False)])
def test_flops_follow_the_formula(tmp_path, select, selection_forward):
    """2 N_s per generated token; 2 N_t per prompt + response token the teacher reads (+ 2 N_s for the student's
    no-grad selection forward when the selector needs the student); 6 N_s per student prompt + response token."""
    from esr.train.session import batch_indices, build_session

    cfg = load_config(SMOKE, ["train.steps=1", f"loss.select={select}", "loss.select_n=4"])
    (row,) = train(cfg, tmp_path / "r", progress=False).metrics
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    n_s, n_t = info["student_params"], info["teacher_params"]
    prompts = build_session(cfg).prompt_ids
    prompt_tokens = sum(len(prompts[i]) for i in batch_indices(len(prompts), cfg.train.batch_size, 0, cfg.seed))
    tokens = prompt_tokens + row["tokens_generated"]  # what each model's forward reads
    assert row["flops_generate"] == 2 * n_s * row["tokens_generated"]
    assert row["flops_score"] == 2 * n_t * tokens + (2 * n_s * tokens if selection_forward else 0)
    assert row["flops_train"] == 6 * n_s * tokens
    assert n_t > n_s > 0


def test_summary_shows_total_compute_and_reads_old_metrics(tmp_path):
    from rich.console import Console

    from esr.train.progress import summary_table

    old = {"step": 1, "skipped": False, "kl": 0.5, "seconds_generate": 1.0, "seconds_score": 1.0,
           "seconds_train": 1.0, "tokens_generated": 10, "tokens_scored": 10, "peak_mem_gb": 1.0}
    new = {**old, "step": 2, "flops_generate": 1e14, "flops_score": 3e14, "flops_train": 6e14}

    def render(rows):
        console = Console(record=True, width=200)
        console.print(summary_table(rows, tmp_path))
        return console.export_text()

    assert "compute" not in render([old])  # lines from before esr counted FLOPs
    assert "1.0e+15 FLOPs (gen 10%, score 30%, train 60%)" in render([old, new])
