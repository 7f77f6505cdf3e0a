"""Function-call parsing and BFCL matching, on real BFCL rows (skipped when the bfcl-eval package is absent)."""

from __future__ import annotations

import importlib.util
import json
import sys
from typing import Any

import pytest

from esr.eval.function_calls import BfclItem, Call, load_bfcl, match_calls, parse_calls, render_tools_prompt

CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple")
needs_bfcl = pytest.mark.skipif(
    importlib.util.find_spec("bfcl_eval") is None,
    reason="bfcl_eval is not installed (BFCL data): pip install --no-deps bfcl-eval==2026.3.23",
)


def _concrete(value: Any) -> Any:
    """A concrete value from an allowed value: BFCL's answer-form dicts ({key: [allowed]}) take each key's first
    choice and leave out keys whose first choice is ""."""
    if isinstance(value, dict):
        if all(isinstance(choices, list) for choices in value.values()):
            return {k: _concrete(choices[0]) for k, choices in value.items() if choices and choices[0] != ""}
        return {k: _concrete(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_concrete(v) for v in value]
    return value


def _gt_calls(item: BfclItem) -> list[tuple[str, dict[str, Any]]]:
    """The ground truth as concrete calls: the first allowed value of each parameter; an optional parameter with ""
    allowed is left out (a required one takes its first non-"" value)."""
    docs = {doc["name"]: doc for doc in item.functions}
    calls = []
    for entry in item.ground_truth:
        for name, allowed in entry.items():
            required = docs[name]["parameters"].get("required", [])
            args = {}
            for param, options in allowed.items():
                if "" in options and param not in required:
                    continue
                args[param] = _concrete(next(o for o in options if o != ""))
            calls.append((name, args))
    return calls


def _python(calls: list[tuple[str, dict[str, Any]]]) -> str:
    rendered = (f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})" for name, args in calls)
    return "[" + ", ".join(rendered) + "]"


def _item(category: str, item_id: str) -> BfclItem:
    return next(item for item in load_bfcl(category) if item.id == item_id)


def _match(item: BfclItem, calls: list[tuple[str, dict[str, Any]]], **kwargs: Any):
    parsed = parse_calls(_python(calls))
    assert parsed is not None
    return match_calls(parsed, item.ground_truth, item.functions, **kwargs)


# ------------------------------------------------------------------------------------------------ parsing (no data)

PYTHON_TEXT = "[get_weather(city='Paris', days=3), math.factorial(number=5)]"
EXPECTED = [Call("get_weather", {"city": "Paris", "days": 3}), Call("math.factorial", {"number": 5})]


@pytest.mark.parametrize(
    "text",
    [
        PYTHON_TEXT,
        "get_weather(city='Paris', days=3), math.factorial(number=5)",
        f"```python\n{PYTHON_TEXT}\n```",
        f"<think>Paris weather, then 5!</think>\n{PYTHON_TEXT}",
        '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}},'
        ' {"name": "math.factorial", "parameters": {"number": 5}}]',
        '```json\n[{"get_weather": {"city": "Paris", "days": 3}}, {"math.factorial": {"number": 5}}]\n```',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n'
        '<tool_call>\n{"name": "math.factorial", "arguments": {"number": 5}}\n</tool_call>',
        '[{"type": "function", "function": {"name": "get_weather",'
        ' "arguments": "{\\"city\\": \\"Paris\\", \\"days\\": 3}"}},'
        ' {"function": "math.factorial", "parameters": {"number": 5}}]',
    ],
    ids=["python", "no-brackets", "fenced", "think", "json-list", "json-map", "tool-call-tags", "openai"],
)
def test_formats_parse_to_the_same_calls(text: str) -> None:
    assert parse_calls(text) == EXPECTED


def test_single_call_forms() -> None:
    expected = [Call("f", {"a": 1, "b": [1.5, -2], "c": {"k": None}, "d": True})]
    assert parse_calls("f(a=1, b=[1.5, -2], c={'k': None}, d=True)") == expected
    assert parse_calls('{"name": "f", "arguments": {"a": 1, "b": [1.5, -2], "c": {"k": null}, "d": true}}') == expected
    assert parse_calls("[]") == []


@pytest.mark.parametrize(
    "text",
    ["", "I cannot help with that.", "[f(a=1)] because the user asked", "f(**kwargs)", "[1, 2]", "{'x': 1}",
     "<tool_call>not json</tool_call>", "__import__('os').system('echo pwned')", "```\nnothing here\n```"],
)
def test_garbage_does_not_parse(text: str) -> None:
    assert parse_calls(text) is None


def test_arguments_are_never_evaluated() -> None:
    (call,) = parse_calls("f(a=open('x'), b=1 + 2, c=data['y'], d=[x, 1])")  # type: ignore[misc]
    assert call.arguments == {"a": "open('x')", "b": "1 + 2", "c": "data['y']", "d": ["x", 1]}


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bfcl_eval", None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps bfcl-eval"):
        load_bfcl("simple")


# ------------------------------------------------------------------------------------------------ real BFCL rows


@needs_bfcl
@pytest.mark.parametrize("category", CATEGORIES)
def test_ground_truth_matches_itself(category: str) -> None:
    items = load_bfcl(category)
    assert len(items) >= 200
    for item in items:
        calls = _gt_calls(item)
        as_json = json.dumps([{"name": name, "arguments": args} for name, args in calls])
        for text in (_python(calls), as_json, f"<tool_call>{as_json}</tool_call>"):
            parsed = parse_calls(text)
            assert parsed is not None, (item.id, text)
            match = match_calls(parsed, item.ground_truth, item.functions)
            assert match.full_correct and match.name_correct, (item.id, text, match.reason)


@needs_bfcl
def test_load_bfcl() -> None:
    items = load_bfcl("parallel_multiple", limit=5)
    assert [item.id for item in items] == [f"parallel_multiple_{i}" for i in range(5)]
    assert items[0].messages[0]["role"] == "user" and items[0].functions and len(items[0].ground_truth) == 2
    assert load_bfcl("simple", limit=1)[0].id == "simple_python_0"
    with pytest.raises(ValueError, match="available: .*parallel_multiple"):
        load_bfcl("paralel")


@needs_bfcl
def test_render_tools_prompt() -> None:
    item = load_bfcl("simple", limit=1)[0]
    messages = render_tools_prompt(item)
    assert [m["role"] for m in messages] == ["system", "user"] and messages[1] == item.messages[0]
    system = messages[0]["content"]
    assert "[func_name1(params_name1=params_value1" in system and '"name": "calculate_triangle_area"' in system
    assert "Note that the provided function is in Python 3 syntax." in system
    assert "Python 3 syntax" not in item.functions[0]["description"]  # the item is not changed


@needs_bfcl
def test_argument_errors() -> None:
    item = _item("simple", "simple_python_0")  # calculate_triangle_area(base: int, height: int, unit: str = "units")
    ok = {"base": 10, "height": 5}
    assert _match(item, [("calculate_triangle_area", ok)]).full_correct
    assert _match(item, [("calculate_triangle_area", {**ok, "unit": "UNITS"})]).full_correct  # standardized string
    for args, reason in [
        ({**ok, "base": "10"}, "type"),
        ({**ok, "base": 10.0}, "type"),
        ({**ok, "base": True}, "type"),
        ({"base": 10}, "missing required parameter 'height'"),
        ({**ok, "color": "red"}, "unexpected parameter 'color'"),
        ({**ok, "height": 6}, "is not one of"),
    ]:
        match = _match(item, [("calculate_triangle_area", args)])
        assert match.name_correct and not match.full_correct and reason in match.reason, (args, match)


@needs_bfcl
def test_function_names() -> None:
    item = _item("simple", "simple_python_1")  # math.factorial(number=5)
    assert _match(item, [("math.factorial", {"number": 5})]).full_correct
    assert _match(item, [("math_factorial", {"number": 5})]).full_correct  # BFCL's "." -> "_" rewrite
    wrong = _match(item, [("math.gamma", {"number": 5})])
    assert not wrong.name_correct and not wrong.full_correct
    twice = _match(item, [("math.factorial", {"number": 5})] * 2)
    assert not twice.name_correct and not twice.full_correct and "expected 1 call(s), got 2" in twice.reason


@needs_bfcl
def test_int_accepted_for_float() -> None:
    found = None
    for item in load_bfcl("simple"):
        (name, args), = _gt_calls(item)
        props = next(d for d in item.functions if d["name"] == name)["parameters"]["properties"]
        param = next((p for p, v in args.items() if props[p]["type"] == "float" and float(v).is_integer()), None)
        if param is not None:
            found = (item, name, args, param)
            break
    assert found is not None
    item, name, args, param = found
    assert isinstance(args[param], float)
    assert _match(item, [(name, {**args, param: int(args[param])})]).full_correct, item.id


@needs_bfcl
def test_tuples_and_lists() -> None:
    item = _item("simple", "simple_python_83")  # coord1, coord2: tuple
    args = {"coord1": (33.4484, -112.074), "coord2": [34.0522, -118.2437], "unit": "miles"}
    assert _match(item, [("calculate_distance", args)]).full_correct
    item = _item("simple", "simple_python_37")  # stops: array of strings, either order allowed
    args = {"start_location": "San Francisco", "end_location": "Los Angeles", "stops": ["monterey", "Santa Barbara"]}
    assert _match(item, [("route.estimate_time", args)]).full_correct
    as_tuple = _match(item, [("route.estimate_time", {**args, "stops": ("Monterey", "Santa Barbara")})])
    assert not as_tuple.full_correct and "type" in as_tuple.reason  # BFCL: a tuple is not an array
    one_stop = _match(item, [("route.estimate_time", {**args, "stops": ["Monterey"]})])
    assert not one_stop.full_correct


@needs_bfcl
def test_optional_parameters() -> None:
    item = _item("simple", "simple_python_7")  # calculate_circumference(radius=4, unit="inches"), unit optional
    assert item.ground_truth == [{"calculate_circumference": {"radius": [4], "unit": ["inches", "in"]}}]
    assert _match(item, [("calculate_circumference", {"radius": 4, "unit": "in"})]).full_correct
    omitted = _match(item, [("calculate_circumference", {"radius": 4})])  # "" not allowed: unit must be given
    assert omitted.name_correct and not omitted.full_correct and "missing parameter 'unit'" in omitted.reason
    item = _item("simple", "simple_python_0")  # unit: ["units", ""] may be left out
    assert _match(item, [("calculate_triangle_area", {"base": 10, "height": 5})]).full_correct


@needs_bfcl
def test_parallel_calls_in_any_order() -> None:
    item = _item("parallel", "parallel_0")
    calls = _gt_calls(item)
    assert len(calls) >= 2 and calls != calls[::-1]
    assert _match(item, calls[::-1]).full_correct
    assert not _match(item, calls[::-1], ordered=True).full_correct
    assert _match(item, calls, ordered=True).full_correct
    broken = [(calls[0][0], {**calls[0][1], "unknown": 1}), *calls[1:]]
    match = _match(item, broken[::-1])
    assert match.name_correct and not match.full_correct and "unexpected parameter 'unknown'" in match.reason
