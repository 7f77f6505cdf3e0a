"""Config values and run folders (RELIABILITY.md): a number out of its range, an empty config file, an ``--out`` that
cannot be a run folder. Each row runs the real ``esr`` command once in a child process (exit code 2, one line naming
the cause, no traceback, no run folder made or touched); its other variants run in-process through ``esr.cli.main``.
The schema walk checks every numeric field of the config, so a field added without a range fails here."""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from esr_process import assert_user_error, run_esr

from esr.cli import main
from esr.config import Config, ConfigError, TrainConfig, VllmConfig, load_config
from esr.config.ranges import Range, field_range, numeric_kind
from esr.train import RunFolderError, resume, train
from esr.train.run_folder import check_new_run_folder

SMOKE = "configs/smoke.yaml"


# ----------------------------------------------------------------------------------------------------------------
# Every numeric field of the schema, in-process.


def _numeric_fields(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field[Any], bool, bool]]:
    """(dotted key, field, is an int, may be None) of every int or float field in the tree under ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _numeric_fields(hints[f.name], f"{prefix}{f.name}.")
            continue
        kind, optional = numeric_kind(cls, f.name)
        if kind is not None:
            yield prefix + f.name, f, kind is int, optional


FIELDS = list(_numeric_fields())


def _outside(allowed: Range, integer: bool) -> list[float]:
    """Values just outside each end of ``allowed``."""
    step = 1 if integer else 0.5
    ends = [(allowed.lo, allowed.lo_open, -step), (allowed.hi, allowed.hi_open, step)]
    return [end if is_open else end + delta for end, is_open, delta in ends if end is not None]


def test_every_numeric_field_declares_a_range_that_holds_its_default():
    assert len(FIELDS) >= 50, [key for key, *_ in FIELDS]  # the walk reaches every section
    defaults = Config()
    for key, f, integer, optional in FIELDS:
        allowed = field_range(f)
        assert allowed is not None, f"{key} is a number without a range: declare it with ranged(default, RANGE)"
        default = functools.reduce(getattr, key.split("."), defaults)
        assert (default is None and optional) or default in allowed, (key, default, allowed)
        assert _outside(allowed, integer), f"{key}: a range with no end refuses nothing but nan and inf"


@pytest.mark.parametrize(("key", "f", "integer", "optional"), FIELDS, ids=[key for key, *_ in FIELDS])
def test_every_numeric_field_refuses_nan_inf_and_values_out_of_range(key, f, integer, optional):
    allowed = field_range(f)
    words = allowed.describe(integer) + (" (or null)" if optional else "")
    for value in _outside(allowed, integer):
        shown = str(int(value)) if integer else str(float(value))
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}={shown}"])
        assert str(err.value) == f"{key} must be {words}, got {shown}"
    # nan and inf as YAML (.nan, .inf) and as the strings float() reads ("nan", "inf", "1e999")
    for text, shown in [(".nan", "nan"), ("nan", "nan"), (".inf", "inf"), ("-.inf", "-inf"), ("inf", "inf"),
                        ("1e999", "inf")]:
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}={text}"])
        expected = f"{key} must be an integer" if integer else f"{key} must be {words}, got {shown}"
        assert str(err.value).startswith(expected), (text, str(err.value))


def test_ranges_bound_what_they_say():
    """The edges themselves: closed ends are allowed, open ends are not."""
    cfg = load_config(None, ["loss.beta=0", "rollout.top_p=1", "lora.dropout=0", "eval.every=0", "seed=4294967295",
                             "eval.temperature=0", "train.max_grad_norm=0", "loss.tis_cap=1", "loss.kind=sampled",
                             "rollout.engine=vllm", "rollout.vllm.max_model_len=2", "data.limit=1"])
    assert (cfg.loss.beta, cfg.rollout.top_p, cfg.seed, cfg.loss.tis_cap) == (0.0, 1.0, 2**32 - 1, 1.0)
    for bad in ["lora.dropout=1", "rollout.top_p=0", "rollout.rho=0", "rollout.temperature=0", "seed=4294967296"]:
        with pytest.raises(ConfigError, match=f"{bad.split('=')[0]} must be "):
            load_config(None, [bad])


def test_a_config_built_in_code_gets_the_same_checks():
    with pytest.raises(ConfigError, match=r"^train.lr must be a finite number > 0, got nan$"):
        Config(train=TrainConfig(lr=math.nan))
    with pytest.raises(ConfigError, match=r"^train.steps must be an integer, got 2.5$"):
        Config(train=TrainConfig(steps=2.5))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^train.deterministic"):
        load_config(None, ["train.deterministic=1"])  # not a number field: its own type check still answers
    from esr.config import RolloutConfig

    with pytest.raises(ConfigError, match=r"^rollout.vllm.kv_cache_gib must be a finite number > 0, got inf$"):
        Config(rollout=RolloutConfig(vllm=VllmConfig(kv_cache_gib=math.inf)))


# ----------------------------------------------------------------------------------------------------------------
# One real `esr` process per row.


def test_a_non_finite_or_out_of_range_number_is_one_line_and_makes_no_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    proc = run_esr("train", SMOKE, "train.lr=nan", "--out", out, "--no-progress")
    assert_user_error(proc, "train.lr must be a finite number > 0, got nan")
    assert not out.exists()
    # Variants in-process: YAML's .inf in a file, a probability above 1, a negative count.
    config = tmp_path / "c.yaml"
    config.write_text(Path(SMOKE).read_text() + "eval: {temperature: .inf}\n")
    for argv, message in [([str(config)], "eval.temperature must be a finite number >= 0, got inf"),
                          ([SMOKE, "loss.beta=1.5"], "loss.beta must be a finite number in [0, 1], got 1.5"),
                          ([SMOKE, "train.warmup_steps=-2"], "train.warmup_steps must be at least 0, got -2")]:
        assert main(["train", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1] == f"esr: error: {message}" and "Traceback" not in err
        assert not out.exists()


def test_an_empty_or_non_mapping_config_file_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    proc = run_esr("train", empty, "--out", out, "--no-progress")
    assert_user_error(proc, f"{empty} is empty (no settings)", "configs/smoke.yaml")
    assert not out.exists()
    for text, what in [("# only a comment\n", "is empty"), ("{}\n", "is empty"),
                       ("- student\n- teacher\n", "holds a list"), ("42\n", "holds a single int ('42')"),
                       ("smoke\n", "holds a single str ('smoke')")]:
        empty.write_text(text)
        assert main(["train", str(empty), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"esr: error: {empty} {what}" in err and "configs/smoke.yaml" in err and "Traceback" not in err
        assert not out.exists()
    assert load_config(None).student.name == Config().student.name  # the library's defaults stay available


def test_an_out_path_that_is_a_file_is_refused(tmp_path, capsys):
    afile = tmp_path / "results.txt"
    afile.write_text("mine\n")
    proc = run_esr("train", SMOKE, "--out", afile, "--no-progress")
    assert_user_error(proc, f"--out {afile} is a file, not a folder: choose another --out")
    assert afile.read_text() == "mine\n"
    assert main(["train", SMOKE, "--out", str(afile / "sub" / "run")]) == 2  # a file on the way to it
    assert f"--out {afile / 'sub' / 'run'} cannot be made: {afile} is a file" in capsys.readouterr().err
    assert afile.read_text() == "mine\n"


def test_a_folder_of_other_files_is_refused_and_left_alone(tmp_path, capsys):
    folder = tmp_path / "notes"
    (folder / "drafts").mkdir(parents=True)
    for name in ("a.txt", "b.txt", "c.txt"):
        (folder / name).write_text(name)
    proc = run_esr("train", SMOKE, "--out", folder, "--no-progress")
    assert_user_error(proc, f"--out {folder} is a folder of other files (a.txt, b.txt, c.txt and 1 more) without a "
                            "run's config.yaml: choose another --out, or empty the folder")
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt", "b.txt", "c.txt", "drafts"]
    empty = tmp_path / "empty"
    empty.mkdir()
    check_new_run_folder(load_config(SMOKE), empty)  # an empty folder is fine, and so is one not made yet
    check_new_run_folder(load_config(SMOKE), tmp_path / "new" / "run")


def test_a_folder_of_another_run_is_refused_and_stays_resumable(tmp_path, capsys):
    run = tmp_path / "run"
    train(load_config(SMOKE, ["train.steps=1"]), run, progress=False)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_esr("train", SMOKE, "train.steps=2", "--out", run, "--no-progress")
    assert_user_error(proc, f"{run} holds another run (train.steps=1 there, 2 here): choose another --out",
                      f"esr train --resume {run}")
    # the same config: continue it with --resume (today's message); another key: named
    with pytest.raises(RunFolderError, match=r"already holds a run: continue it with `esr train --resume"):
        train(load_config(SMOKE, ["train.steps=1"]), run, progress=False)
    with pytest.raises(RunFolderError, match=r"holds another run \(student.name=tiny-student there, x here\)"):
        train(load_config(SMOKE, ["train.steps=1", "student.name=x"]), run, progress=False)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # nothing of the refused runs was written
    assert resume(run, progress=False).steps == 1


def test_resume_of_a_file_or_a_missing_folder_is_one_line(tmp_path, capsys):
    afile = tmp_path / "run.txt"
    afile.write_text("x")
    proc = run_esr("train", "--resume", afile, "--no-progress")
    assert_user_error(proc, f"{afile} is not a run folder (no config.yaml); nothing to resume")
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "missing is not a run folder" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def test_numeric_options_of_other_verbs_are_checked_before_anything_loads(capsys):
    proc = run_esr("eval", "tiny-student", "--task", "gsm_symbolic", "--limit", "-3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "esr eval: error: argument --limit: must be at least 1, got -3"
    for argv, message in [
        (["eval", "m", "--task", "t", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
        (["eval", "m", "--task", "t", "--n", "0"], "argument --n: must be at least 1, got 0"),
        (["eval", "m", "--task", "t", "--temperature", "-1"], "argument --temperature: must be a finite number >= 0"),
        (["generate", "m", "--prompt", "p", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be at least 1"),
        (["generate", "m", "--prompt", "p", "--temperature", "nan"], "argument --temperature: must be a finite number"),
        (["generate", "m", "--prompt", "p", "--top-p", "1.5"], "argument --top-p: must be a finite number in (0, 1]"),
        (["generate", "m", "--prompt", "p", "--seed", "-1"], "argument --seed: must be an integer in [0, 4294967295]"),
        (["probe", "kl-profile", "c", "--share", "0"], "argument --share: must be a finite number in (0, 1], got 0"),
        (["probe", "decay", "c", "--ks", "0", "-5"], "argument --ks: must be at least 0, got -5"),
        (["analyze", "tokens", "r", "--rollouts", "0"], "argument --rollouts: must be at least 1, got 0"),
        (["serve-teacher", "m", "--port", "70000"], "argument --port: must be an integer in [1, 65535], got 70000"),
        (["serve-teacher", "m", "--max-request-mb", "inf"], "argument --max-request-mb: must be a finite number > 0"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err.strip().splitlines()[-1], (argv, err)
    assert main(["eval", "m", "--task", "t", "--n", "4"]) == 2  # greedy with several samples: before any load
    assert "--n 4 greedy samples would all be the same" in capsys.readouterr().err
