"""Bad input a user can hand esr: each one ends in a clear message (CLI: one line, exit code 2, no traceback) or in
a counted skip. Cases already proved elsewhere are listed in RELIABILITY.md with their test; only the gaps are here.
Everything runs on the tiny smoke models (seconds each)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from esr.cli import main
from esr.config import ConfigError, DataConfig, load_config, save_config
from esr.data import load_prompts
from esr.models import load_model
from esr.train import train
from esr.train.session import build_session

SMOKE = "configs/smoke.yaml"

pytestmark = pytest.mark.usefixtures("needs_smollm2_package")


def _jsonl(path: Path, rows: list[object]) -> Path:
    """Rows as JSONL lines: dicts as JSON, str and bytes written as the raw line."""
    lines = [r if isinstance(r, bytes) else r.encode() if isinstance(r, str) else json.dumps(r).encode() for r in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI on a user error: exit code 2 and one message on stderr, never a traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("esr: error: "), err
    return err


def test_misspelled_field_names_the_expected_fields_and_the_typo(tmp_path, capsys):
    rows = [{"quesiton": "What is 2+2?", "answer": "#### 4"}, {"quesiton": "What is 3+3?", "answer": "#### 6"}]
    data = _jsonl(tmp_path / "typo.jsonl", rows)
    out = tmp_path / "run"
    err = _cli_error(capsys, ["train", SMOKE, "data.source=gsm8k", f"data.path={data}", "--out", str(out)])
    assert f"no usable prompts in {data}" in err
    assert "missing field 'question' (found 'quesiton'): 2" in err
    assert "string fields 'question' and 'answer'" in err  # what a good row looks like
    assert not out.exists()
    # With some good rows the run goes on, and the skip count names the typo too.
    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"question": "What is 1+1?", "answer": "#### 2"}, *rows])
    got = load_prompts(DataConfig(source="gsm8k", path=str(mixed)))
    assert got.skip_reasons == {"missing field 'question' (found 'quesiton')": 2} and len(got.prompts) == 1


def test_skipped_rows_are_counted_in_run_json(tmp_path, caplog):
    """Malformed, empty and non-UTF-8 rows are skipped, logged once with reasons, and counted in run.json."""
    data = _jsonl(tmp_path / "data.jsonl", [
        {"prompt": "What is 2+2?"},
        '{"prompt": "cut off',                                   # malformed JSON
        {"prompt": "   "},                                       # empty prompt
        b'{"prompt": "caf\xe9?"}',                               # Latin-1 byte: not UTF-8
        {"messages": [{"role": "system", "content": "only a system turn"}]},  # no user text
        {"prompt": "Name a colour."},
    ])
    cfg = load_config(SMOKE, ["data.source=jsonl", f"data.path={data}", "train.steps=1", "train.batch_size=2"])
    with caplog.at_level(logging.WARNING, logger="esr.data"):
        train(cfg, tmp_path / "run", progress=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["data_rows"], info["data_skipped"], info["prompts"], info["prompts_too_long"]) == (6, 4, 2, 0)
    assert "skipped 4 of 6 rows" in caplog.text and "first bad lines: 2, 3, 4, 5" in caplog.text
    for reason in ("invalid JSON: 1", "empty field 'prompt': 1", "not UTF-8: 1", "no non-empty user turn: 1"):
        assert reason in caplog.text


def test_non_utf8_config_file_is_one_clear_error(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes(b"name: caf\xe9\n")
    err = _cli_error(capsys, ["train", str(config)])
    assert f"{config} is not UTF-8 text (byte 0xe9 at offset 9): save it as UTF-8" in err


def test_prompts_longer_than_the_context_are_skipped_and_counted(tmp_path, caplog):
    """The tiny models' window is 8192 tokens: with rollout.max_new_tokens=8092 a prompt gets at most 100, whatever
    data.max_prompt_tokens says (a 200-token prompt fits data.max_prompt_tokens=512 but not the window)."""
    data = _jsonl(tmp_path / "data.jsonl", [
        {"prompt": "What is 2+2?"}, {"prompt": "word " * 200}, {"prompt": "word " * 600}, {"prompt": "Hi."},
    ])
    base = ["data.source=jsonl", f"data.path={data}", "rollout.n=16"]
    with caplog.at_level(logging.WARNING):
        session = build_session(load_config(SMOKE, [*base, "rollout.max_new_tokens=8092"]))
    assert (session.info["prompts"], session.info["prompts_too_long"]) == (2, 2)
    assert max(len(ids) for ids in session.prompt_ids) <= 100
    assert "prompts are capped at 100 tokens (context window 8192 - rollout.max_new_tokens 8092)" in caplog.text
    assert "dropped 2 of 4 prompts: 2 longer than data.max_prompt_tokens=100" in caplog.text
    # Within the window data.max_prompt_tokens alone decides, and its overflow is counted the same way.
    session = build_session(load_config(SMOKE, [*base, "data.max_prompt_tokens=300"]))
    assert (session.info["prompts"], session.info["prompts_too_long"]) == (3, 1)
    with pytest.raises(ConfigError, match="rollout.max_new_tokens=9000 leaves no room for a prompt .* 8192 tokens"):
        build_session(load_config(SMOKE, [*base, "rollout.max_new_tokens=9000"]))


def test_tokenizer_without_chat_template_gets_the_plain_template_and_a_warning(tmp_path, caplog):
    model, tokenizer = load_model("tiny-student")
    tokenizer.chat_template = None  # what a base model's tokenizer looks like
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = _jsonl(tmp_path / "data.jsonl", [{"prompt": "What is 2+2?"}])
    cfg = load_config(SMOKE, [f"student.name={tmp_path / 'base'}", "data.source=jsonl", f"data.path={data}"])
    with caplog.at_level(logging.WARNING, logger="esr.train"):
        session = build_session(cfg)
    assert f"student '{tmp_path / 'base'}' has no chat template: prompts use the plain" in caplog.text
    assert session.tokenizer.decode(session.prompt_ids[0]) == "Question: What is 2+2?\nAnswer:"


def test_checkpoint_of_another_model_is_refused_on_resume(tmp_path, capsys):
    """A run folder whose checkpoint was written for another student (here: hidden size 64, resumed as 96)."""
    run = train(load_config(SMOKE, ["train.steps=1"]), tmp_path / "a", progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    save_config(load_config(SMOKE, ["train.steps=2", "student.name=tiny-teacher"]), tmp_path / "b" / "config.yaml")
    err = _cli_error(capsys, ["train", "--resume", str(tmp_path / "b"), "--no-progress"])
    ckpt = tmp_path / "b" / "checkpoints" / run.last_checkpoint.name
    assert f"{ckpt} is an adapter for another model or LoRA setting" in err
    assert "size mismatch" in err and "start a new run" in err
