"""rollout.horizon=auto end to end on the tiny pair: N moves by the probes, the probes are logged, the profile file
matches the rule, a crashed run resumes bit-exactly (profile included), and a cross-tokenizer teacher works."""

import json
import re

import numpy as np
import pytest
from crash_resume import crash_and_resume, same_adapter
from rich.console import Console

from esr.config import load_config
from esr.report import write_report
from esr.rollout.auto_horizon import horizon_rule
from esr.train import train
from esr.train.progress import summary_table

SMOKE = "configs/smoke.yaml"
# Start at N = 4 with a probe before every step: the tiny random models disagree about evenly at every position and
# never stop, so the rule wants N* ~ 0.45 * 32 and N doubles 4 -> 8 -> 15.
AUTO = ["rollout.horizon=auto", "rollout.n=4", "rollout.auto.n_min=1", "rollout.auto.every=1",
        "rollout.auto.rollouts=2", "train.steps=3", "train.checkpoint_every=2"]


def _stable(rows):
    """Metrics without wall-clock figures."""
    return [{k: v for k, v in r.items() if "seconds" not in k and k not in ("peak_mem_gb", "probe_share")}
            for r in rows]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return train(load_config(SMOKE, AUTO), tmp_path_factory.mktemp("auto") / "whole", progress=False)


def test_auto_moves_n_by_the_probes_and_logs_them(whole):
    rows = whole.metrics
    horizons = [r["horizon"] for r in rows]
    assert horizons[0] == 8 and horizons[1] > 8 and horizons[1] <= 16  # doubled from 4, then at most again
    assert all(r["probe_kl"] > 0 and r["probe_seconds"] > 0 and r["probe_flops"] > 0 for r in rows)
    assert all(0 < r["probe_share"] < 1 for r in rows)
    profile = [json.loads(line) for line in (whole.run_dir / "auto" / "profile.jsonl").read_text().splitlines()]
    assert [p["step"] for p in profile] == [1, 2, 3] and [p["n"] for p in profile] == horizons
    assert [p["n_before"] for p in profile] == [4, *horizons[:-1]]
    for p in profile:  # the logged N is the rule on the logged profile
        assert len(p["profile"]) == 32 and p["n"] == horizon_rule(p["profile"], 0.45, n_min=1, n_max=32,
                                                                   previous=p["n_before"])
    first = profile[0]  # the first profile is the first probe's mass per rollout (2 rollouts)
    assert first["probe_kl"] == pytest.approx(sum(first["profile"]) * 2 / first["probe_tokens"], rel=1e-9)
    state = json.loads((whole.last_checkpoint / "trainer" / "trainer_state.json").read_text())["auto_horizon"]
    assert state["n"] == horizons[-1] and state["profile"] == profile[-1]["profile"]
    console = Console(record=True, width=200)
    console.print(summary_table(rows, whole.run_dir))
    text = console.export_text()
    assert "horizon N: first -> last" in text and "auto-horizon probes" in text
    assert re.search(r"train \d+%, probe \d+%\)", text)  # the probes' FLOPs in the compute row


def test_an_auto_run_resumes_bit_exactly(whole, tmp_path, monkeypatch):
    resumed = crash_and_resume(monkeypatch, load_config(SMOKE, AUTO), tmp_path / "crashed")  # inside step 3
    assert _stable(resumed.metrics) == _stable(whole.metrics)
    assert same_adapter(whole, resumed)
    read = lambda run: [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                        for line in (run / "auto" / "profile.jsonl").read_text().splitlines()]
    assert read(resumed.run_dir) == read(whole.run_dir)  # step 3's probe folded into the restored profile


def test_auto_across_tokenizers(tmp_path):
    cfg = load_config(SMOKE, [*AUTO, "teacher.name=tiny-teacher-qwen", "loss.cross_tokenizer=aligned-exact",
                              "train.steps=1"])
    rows = train(cfg, tmp_path / "cross", progress=False).metrics
    assert rows[0]["horizon"] == 8 and np.isfinite(rows[0]["probe_kl"]) and rows[0]["probe_kl"] > 0


def test_the_report_shows_n_over_time_and_the_auto_probes(whole, tmp_path):
    _, md_path = write_report([whole.run_dir], tmp_path / "report.md")
    md = md_path.read_text()
    section = md[md.index("## Horizon N"):]
    assert "horizon.png" in section and "auto-profile.png" in section
    n = [json.loads(line)["n"] for line in (whole.run_dir / "auto" / "profile.jsonl").read_text().splitlines()]
    assert f"| 1 | 4 → {n[0]} |" in section and f"| 3 | {n[1]} → {n[2]} |" in section  # before step, N moved
    assert "auto (from N=4" in md  # the runs table names the horizon
    assert (md_path.parent / "report_files" / "auto-profile.png").read_bytes()[:4] == b"\x89PNG"
