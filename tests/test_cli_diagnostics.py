"""`esr probe`, `esr analyze` and `esr report` end to end on the tiny models: exit codes, files, one-line errors."""

import json

import pytest

from esr.cli import main
from esr.config import load_config
from esr.train import train

SMOKE = "configs/smoke.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(load_config(SMOKE, ["train.steps=2", "train.checkpoint_every=1"]), out, progress=False)
    return out


def test_probe_kl_profile_and_decay(tmp_path, capsys):
    out = tmp_path / "kl"
    assert main(["probe", "kl-profile", SMOKE, "--rollouts", "2", "--max-new-tokens", "8", "--out", str(out),
                 "--no-progress"]) == 0
    out_text = capsys.readouterr().out
    assert "recommended N =" in out_text and "(token-mass rule, as rollout.horizon=auto" in out_text
    assert "position-weighted: N =" in out_text
    assert "highest-KL tokens of a rollout hold" in out_text
    assert (out / "kl_profile.json").is_file() and (out / "kl_profile.png").is_file()
    out = tmp_path / "decay"
    assert main(["probe", "decay", SMOKE, "--ks", "0", "4", "--limit", "2", "--max-new-tokens", "8", "--out",
                 str(out), "--no-progress"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("k=")]
    assert len(lines) == 2 and "Delta(k) +0.000" in lines[0]
    assert json.loads((out / "decay.json").read_text())


def test_analyze_and_report_a_run(run_dir, tmp_path, capsys):
    common = ["--rollouts", "2", "--max-new-tokens", "8", "--no-progress"]
    assert main(["analyze", "cascade", str(run_dir), *common]) == 0
    assert "KL drop inside [0, 16)" in capsys.readouterr().out
    assert main(["analyze", "modes", str(run_dir), *common]) == 0
    assert main(["analyze", "tokens", str(run_dir), *common]) == 0
    names = {p.name for p in (run_dir / "analysis").iterdir()}
    assert {"cascade.json", "modes.json", "tokens.json"} <= names
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "cascade" in html and "data:image/png;base64," in html


def test_bad_run_folder_is_one_line_error(tmp_path, capsys):
    assert main(["analyze", "cascade", str(tmp_path / "nope"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("esr: error:")
