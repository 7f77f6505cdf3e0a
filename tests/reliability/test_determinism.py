"""Same config and seed on CPU: the same metrics to the last digit and the same weights bit for bit."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from esr.config import load_config
from esr.train import train

SMOKE = "configs/smoke.yaml"
TIMINGS = {"seconds_align", "seconds_generate", "seconds_score", "seconds_train", "seconds_extrapolate",
           "peak_mem_gb"}


def test_two_runs_with_one_seed_are_identical(tmp_path, needs_smollm2_package):
    overrides = ["train.steps=3", "loss.select=random-n", "loss.select_n=8", "optim.extrapolate.enabled=true"]
    a = train(load_config(SMOKE, overrides), tmp_path / "a", progress=False)
    b = train(load_config(SMOKE, overrides), tmp_path / "b", progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]  # noqa: E731
    assert strip(a.metrics) == strip(b.metrics)  # floats compared exactly
    wa, wb = (load_file(r.last_checkpoint / "adapter_model.safetensors") for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train(load_config(SMOKE, [*overrides, "seed=1"]), tmp_path / "c", progress=False)
    assert strip(c.metrics) != strip(a.metrics)  # the seed does matter


def test_deterministic_mode_runs(tmp_path, needs_smollm2_package):
    try:
        rows = train(load_config(SMOKE, ["train.steps=1", "train.deterministic=true"]), tmp_path / "d",
                     progress=False).metrics
    finally:
        torch.use_deterministic_algorithms(False)
    assert rows[0]["kl"] > 0
