"""A run that crashes mid-step and is resumed: the shared harness of the bit-exact resume tests.

    resumed = crash_and_resume(monkeypatch, load_config(SMOKE, overrides), tmp_path / "crashed")
    assert same_adapter(whole, resumed)

The crash is a ``RuntimeError`` raised in the ``crash_at_call``-th micro-batch (``esr.train.step.distill_micro_batch``
as ``esr.train.run_step`` calls it): with two micro-batches a step, the 5th call is inside step 3.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import esr.train.run_step as step_module
from esr.config import Config
from esr.train import RunResult, resume, train


def crash_and_resume(monkeypatch: pytest.MonkeyPatch, cfg: Config, run_dir: Path, *,
                     crash_at_call: int = 5) -> RunResult:
    """Train ``cfg`` into ``run_dir`` until the ``crash_at_call``-th micro-batch raises, then resume the folder."""
    calls, real = {"n": 0}, step_module.distill_micro_batch

    def crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == crash_at_call:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "distill_micro_batch", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, run_dir, progress=False)
    monkeypatch.setattr(step_module, "distill_micro_batch", real)
    return resume(run_dir, progress=False)


def same_adapter(a: RunResult, b: RunResult) -> bool:
    """Whether the two runs' last checkpoints hold bit-identical LoRA adapters."""
    wa, wb = (load_file(r.last_checkpoint / "adapter_model.safetensors") for r in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
