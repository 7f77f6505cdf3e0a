"""Chat rows with tools and earlier turns: validation and normalisation of ``messages`` and ``tools``.

A row ``{"messages": [...], "tools": [...]}`` (the OpenAI / Hugging Face form) becomes a prompt:

- turns are ``system``, ``user``, ``assistant`` and ``tool`` (any other role with string content is kept as written);
  an assistant turn may carry ``tool_calls`` (``[{"type": "function", "function": {"name", "arguments"}}]``, the
  flat ``{"name", "arguments"}`` is accepted) and then may have empty or null content; ``arguments`` given as a JSON
  string are parsed into an object; a ``tool`` turn has string content and optional ``tool_call_id`` / ``name``;
- ``tools`` entries are normalised to ``{"type": "function", "function": {"name", "description", "parameters"}}``
  (the bare ``{"name", ...}`` function doc is accepted);
- the rollout is the NEXT assistant turn: every turn of the row is context and gets no loss. A row whose messages end
  with an assistant turn has that turn removed: it is the reference, kept as the answer (its text, or its tool calls
  as JSON) unless the row has its own ``answer``.

Anything malformed raises ``RowSkip`` with the reason, so the row is skipped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from esr.data.rows import Message, ParsedRow, RowSkip, Tools


def chat_row(row: Mapping[str, object], answer: str | None) -> ParsedRow:
    """The prompt of a ``messages`` row (trailing assistant turn removed, see the module docstring) and its tools."""
    messages = chat_messages(row["messages"])
    tools = normalise_tools(row["tools"]) if row.get("tools") is not None else None
    if messages[-1]["role"] == "assistant":
        reference = messages.pop()
        if answer is None:
            answer = assistant_text(reference) or None
    if not any(m["role"] != "system" and (m["content"].strip() or m.get("tool_calls")) for m in messages):
        raise RowSkip("field 'messages' has no non-empty turn before the assistant turn to sample")
    return ParsedRow(messages, answer, tools)


def chat_messages(value: object) -> list[Message]:
    """Validate and normalise a ``messages`` list (at least one non-empty non-system turn)."""
    if not isinstance(value, list) or not value:
        raise RowSkip("field 'messages' is not a non-empty list")
    messages = [_message(item) for item in value]
    if not any(m["role"] != "system" and (m["content"].strip() or m.get("tool_calls")) for m in messages):
        raise RowSkip("field 'messages' has no non-empty user turn")
    return messages


def _message(item: object) -> Message:
    if not (isinstance(item, dict) and isinstance(item.get("role"), str)):
        raise RowSkip("a message is not an object with string 'role' and 'content'")
    role, content = item["role"], item.get("content")
    if role == "assistant" and item.get("tool_calls"):
        if content is not None and not isinstance(content, str):
            raise RowSkip("an assistant message's 'content' is not a string or null")
        calls = [_tool_call(c) for c in _list(item, "tool_calls")]
        return {"role": role, "content": content or "", "tool_calls": calls}
    if not isinstance(content, str):
        raise RowSkip("a message is not an object with string 'role' and 'content'")
    message: Message = {"role": role, "content": content}
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if item.get(key) is not None:
                if not isinstance(item[key], str):
                    raise RowSkip(f"a tool message's '{key}' is not a string")
                message[key] = item[key]
    return message


def _list(item: Mapping[str, Any], key: str) -> list[Any]:
    if not isinstance(item[key], list):
        raise RowSkip(f"'{key}' is not a list")
    return item[key]


def _tool_call(call: object) -> dict[str, Any]:
    """``{"type": "function", "function": {"name", "arguments": {...}}}`` (plus ``id`` when given)."""
    if not isinstance(call, dict):
        raise RowSkip("a tool call is not an object")
    function = call.get("function", call)
    if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"].strip()):
        raise RowSkip("a tool call has no string 'name'")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise RowSkip("a tool call's 'arguments' is not valid JSON") from None
    if not isinstance(arguments, dict):
        raise RowSkip("a tool call's 'arguments' is not an object")
    out: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def normalise_tools(value: object) -> Tools | None:
    """``tools`` as a tuple of ``{"type": "function", "function": {...}}`` (None when empty); a bare doc is wrapped."""
    if not isinstance(value, list):
        raise RowSkip("field 'tools' is not a list")
    tools = []
    for tool in value:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"].strip()):
            raise RowSkip("a tool is not a function object with a string 'name'")
        if not isinstance(function.get("parameters", {}), dict):
            raise RowSkip(f"tool '{function['name']}' has 'parameters' that is not an object")
        tools.append({"type": "function", "function": dict(function)})
    return tuple(tools) or None


def assistant_text(message: Mapping[str, Any]) -> str:
    """An assistant turn as text: its content, then its tool calls as JSON ``{"name", "arguments"}`` lines."""
    calls = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
             for c in message.get("tool_calls") or ()]
    return "\n".join(part for part in (message.get("content") or "", *calls) if part)
