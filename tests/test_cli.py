"""The CLI verbs other than train (train is covered in tests/train/test_loop.py)."""

import pytest

from esr.cli import main


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "esr train configs/quickstart.yaml" in out and "esr train --resume" in out


def test_models_lists_every_preset(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct", "tiny-student"):
        assert name in out


def test_generate_is_seeded_and_greedy_is_deterministic(capsys):
    args = ["generate", "tiny-student", "--prompt", "Hello", "--max-new-tokens", "6"]
    assert main([*args, "--temperature", "0"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "--temperature", "0"]) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("### Hello\n")
    assert main([*args, "--temperature", "1.0", "--seed", "1"]) == 0
    sampled = capsys.readouterr().out
    assert main([*args, "--temperature", "1.0", "--seed", "1"]) == 0
    assert capsys.readouterr().out == sampled


def test_unknown_model_is_one_clear_line(capsys):
    assert main(["generate", "qwen2.5-coder-0.5b-instruc", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "qwen2.5-coder-0.5b-instruct" in err and "Traceback" not in err


def test_resume_needs_a_run_folder(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_resume_takes_overrides_but_no_config(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "configs/smoke.yaml"]) == 2
    err = capsys.readouterr().err
    assert "drop configs/smoke.yaml" in err and "train.steps" in err
    assert main(["train", "--resume", str(tmp_path), "train.steps=5"]) == 2  # overrides pass; no run folder here
    assert "not a run folder" in capsys.readouterr().err


def test_a_config_error_is_reported_before_torch_is_imported():
    """`esr train` checks the config before it imports the training code (torch, transformers: seconds), so a
    mistyped value fails at once; the child is a fresh interpreter, so nothing was imported before."""
    import subprocess
    import sys

    from esr_process import REPO, esr_env

    code = ("import sys; from esr.cli import main\n"
            "code = main(['train', 'configs/smoke.yaml', 'train.lr=nan', '--no-progress'])\n"
            "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=esr_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stderr[-3000:]
    assert proc.stderr.strip() == "esr: error: train.lr must be a finite number > 0, got nan"
