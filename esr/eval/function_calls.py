"""Function-call outputs: parse what a model wrote into calls, and score them against BFCL's ground truth.

    calls = parse_calls(completion)          # None: nothing parses (counts against the parse rate)
    match = match_calls(calls, item.ground_truth, item.functions)

Parsing accepts Python call syntax (``[f(a=1, b="x"), g(c=[1, 2])]``, ``f(a=1)``, dotted names such as
``math.factorial``; argument values go through ``ast.literal_eval`` only, never ``eval``) and JSON (an object
``{"name": ..., "arguments" | "parameters": {...}}``, a list of them, or ``{func: {args}}`` maps), bare or inside
```` ``` ```` fences or Qwen-style ``<tool_call>...</tool_call>`` tags. A ``<think>...</think>`` block is dropped first.

Matching follows BFCL's AST checker (``bfcl_eval/eval_checker/ast_eval/ast_checker.py``), Python rules:

* the number of calls must equal the number of ground-truth calls; the calls pair one-to-one with the ground truth
  in any order (``ordered=True``: in the given order);
* the function name must match; ``.`` and ``_`` are treated alike (BFCL rewrites ``.`` to ``_`` for models whose
  API forbids dots in names);
* every required parameter is present, no parameter outside the function's schema or the ground truth appears, and
  a ground-truth parameter may be left out only when ``""`` is among its allowed values;
* a value must have its declared type (``string``, ``integer``, ``float``, ``boolean``, ``array`` and ``tuple`` as a
  list, ``dict``, ``any`` as a string; other types are unchecked; a ``bool`` is never an ``integer``), where an
  ``int`` is accepted for a ``float`` and a tuple for a ``tuple``, but not for an ``array``; array items are checked
  one level deep (no int for float there). A value of the allowed values' type is accepted too: BFCL's "variable"
  case, where the allowed values' type differs from the declared one (``"data['x']"`` for an array) and the value
  is then compared exactly;
* otherwise the value must equal one of the allowed values: strings after BFCL's ``standardize_string`` (lowercase,
  without spaces and ``,./-_*^``, ``'`` read as ``"``), numbers by value, lists element by element, and dicts in
  BFCL's answer form (``{key: [allowed values]}``) key by key, where a key may be left out when ``""`` is allowed.

``name_correct`` is the weaker score: the multiset of called names equals the ground truth's.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from esr.data.bfcl import BfclItem, load_bfcl, render_tools_prompt

__all__ = ["BfclItem", "Call", "CallMatch", "load_bfcl", "match_calls", "parse_calls", "render_tools_prompt"]


@dataclass(frozen=True)
class Call:
    """One function call: the (possibly dotted) name and its keyword arguments as Python values."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class CallMatch:
    """How a model's calls compare with the ground truth; ``reason`` says why ``full_correct`` is False ("" if not)."""

    name_correct: bool
    full_correct: bool
    reason: str


# ---------------------------------------------------------------------------------------------------------- parsing

_THINK = re.compile(r"<think>.*?</think>", re.S)
_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)
_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)```", re.S)


def parse_calls(text: str) -> list[Call] | None:
    """The calls in a model's output, or None when it holds no parseable call list (``[]`` parses to no call)."""
    text = _THINK.sub("", text)
    if "</think>" in text:  # the opening tag was part of the prompt
        text = text.rsplit("</think>", 1)[1]
    text = text.strip()
    blocks = _TOOL_CALL.findall(text) or _FENCE.findall(text) or [text]
    calls: list[Call] = []
    for block in blocks:
        parsed = _parse_block(block.strip().strip("`").strip())
        if parsed is None:
            return None
        calls.extend(parsed)
    return calls


def _parse_block(text: str) -> list[Call] | None:
    if not text:
        return None
    try:
        return _from_structured(json.loads(text))
    except ValueError:
        pass
    try:
        body = ast.parse(text.strip("'"), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    nodes = body.elts if isinstance(body, (ast.List, ast.Tuple)) else [body]
    if all(isinstance(node, ast.Call) for node in nodes):
        calls = [_call_from_node(node) for node in nodes]
        return None if any(call is None for call in calls) else calls  # type: ignore[return-value]
    try:
        return _from_structured(ast.literal_eval(body))  # a Python-literal rendering of the JSON forms
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return None


def _from_structured(obj: Any) -> list[Call] | None:
    """Calls from decoded JSON: a call object, a ``{func: {args}}`` map, or a list of those."""
    if isinstance(obj, list):
        calls: list[Call] = []
        for element in obj:
            parsed = _from_structured(element) if isinstance(element, dict) else None
            if parsed is None:
                return None
            calls.extend(parsed)
        return calls
    if not isinstance(obj, dict) or not obj:
        return None
    if isinstance(obj.get("function"), dict):  # OpenAI style {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name", obj.get("function"))
    if isinstance(name, str):
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # OpenAI sends the arguments JSON-encoded
            try:
                args = json.loads(args)
            except ValueError:
                return None
        return [Call(name, args)] if isinstance(args, dict) else None
    if all(isinstance(key, str) and isinstance(value, dict) for key, value in obj.items()):
        return [Call(key, value) for key, value in obj.items()]
    return None


def _call_from_node(node: ast.Call) -> Call | None:
    """A call from its AST; positional arguments are ignored (as BFCL does), ``**kwargs`` make it unparseable."""
    parts: list[str] = []
    func: ast.expr = node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts.append(func.id)
    arguments: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            return None
        arguments[keyword.arg] = _literal(keyword.value)
    return Call(".".join(reversed(parts)), arguments)


def _literal(node: ast.expr) -> Any:
    """A literal's value; a name or any other expression becomes its source text (BFCL's "variable"), never run."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        pass
    if isinstance(node, ast.List):
        return [_literal(element) for element in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_literal(element) for element in node.elts)
    if isinstance(node, ast.Dict) and all(key is not None for key in node.keys):
        pairs = zip(node.keys, node.values, strict=True)
        return {_literal(key): _literal(value) for key, value in pairs}  # type: ignore[arg-type]
    if isinstance(node, ast.Name):
        return node.id
    return ast.unparse(node)


# --------------------------------------------------------------------------------------------------------- matching

_TYPES: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}
"""BFCL's Python type for each declared type (its ``PYTHON_TYPE_MAPPING``); other declared types are not checked."""


def standardize_string(text: str) -> str:
    """BFCL's string normal form: no spaces or ``,./-_*^``, lowercase, ``'`` read as ``"``."""
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def _canonical_name(name: str) -> str:
    return name.replace(".", "_")


def match_calls(
    calls: list[Call], ground_truth: list[dict], functions: list[dict], *, ordered: bool = False
) -> CallMatch:
    """Score ``calls`` against BFCL ``ground_truth`` (``[{func: {param: [allowed values]}}]``) and the function docs."""
    expected = [(name, allowed) for entry in ground_truth for name, allowed in entry.items()]
    name_correct = Counter(_canonical_name(c.name) for c in calls) == Counter(_canonical_name(n) for n, _ in expected)
    if len(calls) != len(expected):
        return CallMatch(name_correct, False, f"expected {len(expected)} call(s), got {len(calls)}")
    docs = {doc["name"]: doc for doc in functions}
    errors = [[_call_error(call, name, allowed, docs.get(name)) for call in calls] for name, allowed in expected]
    if ordered:
        wrong = next((i for i in range(len(calls)) if errors[i][i] is not None), None)
        reason = "" if wrong is None else f"call {wrong}: {errors[wrong][wrong]}"
        return CallMatch(name_correct, wrong is None, reason)
    if _assign(errors, 0, set()):
        return CallMatch(name_correct, True, "")
    unmatched = [all(row[j] is not None for row in errors) for j in range(len(calls))]  # calls no entry accepts
    for (name, _), row in zip(expected, errors, strict=True):
        if all(error is not None for error in row):  # explain with a same-name call, one that matches nothing first
            same = [j for j, c in enumerate(calls) if _canonical_name(c.name) == _canonical_name(name)]
            j = min(same, key=lambda j: not unmatched[j]) if same else 0
            return CallMatch(name_correct, False, f"no call matches {name!r}: {row[j]}")
    return CallMatch(name_correct, False, "the calls cannot be paired one-to-one with the ground truth")


def _assign(errors: list[list[str | None]], i: int, used: set[int]) -> bool:
    """Whether ground-truth calls ``i..`` can each take a distinct matching call (backtracking; n is at most ~10)."""
    if i == len(errors):
        return True
    for j, error in enumerate(errors[i]):
        if error is None and j not in used and _assign(errors, i + 1, used | {j}):
            return True
    return False


def _call_error(call: Call, name: str, allowed: dict[str, list], doc: dict | None) -> str | None:
    """Why ``call`` does not match the ground-truth call ``name(allowed)``, or None when it does."""
    if _canonical_name(call.name) != _canonical_name(name):
        return f"wrong function {call.name!r}, expected {name!r}"
    if doc is None:
        return f"ground-truth function {name!r} is not among the functions"
    schema = doc.get("parameters", {})
    properties: dict[str, dict] = schema.get("properties", {})
    for param in schema.get("required", []):
        if param not in call.arguments:
            return f"missing required parameter {param!r}"
    for param, value in call.arguments.items():
        if param not in properties or param not in allowed:
            return f"unexpected parameter {param!r}"
        spec, options = properties[param], allowed[param]
        if spec.get("type") == "float" and type(value) is int:
            value = float(value)
        elif spec.get("type") == "tuple" and type(value) is tuple:
            value = list(value)
        if not _type_ok(value, spec, options):
            return f"parameter {param!r}: {value!r} is not of type {spec.get('type')!r}"
        if _is_variable(spec, options):  # BFCL compares "variables" exactly
            if value not in options:
                return f"parameter {param!r}: {value!r} is not one of {options!r}"
        elif not any(_equal(value, option, schema=True) for option in options):
            return f"parameter {param!r}: {value!r} is not one of {options!r}"
    for param, options in allowed.items():
        if param not in call.arguments and "" not in options:
            return f"missing parameter {param!r}"
    return None


def _first_type(options: list) -> type | None:
    """The type of the first allowed value that is not "" (BFCL's "possible answer type"), None if there is none."""
    return next((type(option) for option in options if not (isinstance(option, str) and option == "")), None)


def _is_variable(spec: dict, options: list) -> bool:
    """BFCL's "variable" case: the allowed values' type differs from the declared one (e.g. a name for an array)."""
    expected, reference = _TYPES.get(spec.get("type", "")), _first_type(options)
    return expected is not None and reference is not None and reference is not expected


def _type_ok(value: Any, spec: dict, options: list) -> bool:
    """BFCL's type check: the declared type (array items too, one level) or the type of the allowed values."""
    expected = _TYPES.get(spec.get("type", ""))
    if expected is None:
        return True
    if type(value) is not expected:
        return type(value) is _first_type(options)
    item_spec = spec.get("items")
    if expected is not list or not isinstance(item_spec, dict) or item_spec.get("type") not in _TYPES:
        return True
    item_type = _TYPES[item_spec["type"]]
    return any(
        not isinstance(option, list) or all(type(item) in (item_type, _first_type(option)) for item in value)
        for option in options
    )


def _equal(value: Any, option: Any, *, schema: bool = False) -> bool:
    """Whether ``value`` equals one allowed ``option``; with ``schema`` a dict option is in BFCL's answer form."""
    if isinstance(option, bool) or isinstance(value, bool):
        return type(value) is type(option) and value == option
    if isinstance(option, str):
        return isinstance(value, str) and standardize_string(value) == standardize_string(option)
    if isinstance(option, (int, float)):
        return isinstance(value, (int, float)) and value == option
    if isinstance(option, (list, tuple)):
        return (
            isinstance(value, (list, tuple))
            and len(value) == len(option)
            and all(_equal(v, o, schema=schema) for v, o in zip(value, option, strict=True))
        )
    if isinstance(option, dict):
        if not isinstance(value, dict):
            return False
        if schema and all(isinstance(choices, list) for choices in option.values()):
            return all(key in option and any(_equal(v, o) for o in option[key]) for key, v in value.items()) and all(
                key in value or "" in choices for key, choices in option.items()
            )
        return value.keys() == option.keys() and all(_equal(value[key], option[key]) for key in option)
    return value == option
