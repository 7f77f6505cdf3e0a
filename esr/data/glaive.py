"""The glaive-function-calling-v2 row form (``hf:glaiveai/glaive-function-calling-v2``, or a JSONL file with
``data.source=glaive``) turned into chat messages with tools.

A row is two strings::

    system: "SYSTEM: You are a helpful assistant with access to the following functions. Use them if required -\n
             {"name": "get_news", "description": ..., "parameters": {...}}\n\n{...another function...}"
    chat:   "USER: ... ASSISTANT: <functioncall> {"name": "get_news", "arguments": '{"country": "US"}'} <|endoftext|>
             \n\n\nFUNCTION RESPONSE: {...}\n\n\nASSISTANT: ... <|endoftext|>\n\n\nUSER: ..."

The system text before the first ``{`` is the system message; the JSON objects after it are the tools (none: a row
"with no access to external functions"). ``USER:`` / ``ASSISTANT:`` / ``FUNCTION RESPONSE:`` start the turns;
``<functioncall> {...}`` is an assistant tool call whose ``arguments`` may be an object or a JSON string in single
quotes; a function response is a ``tool`` turn.

Which turn is trained: one prompt per row, ending before its FIRST assistant turn (the turn that decides whether and
how to call a function, what BFCL measures); that turn's text is the reference answer. Later turns are read and
validated but not used.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from esr.data.chat import assistant_text, normalise_tools
from esr.data.rows import Message, ParsedRow, RowSkip

GLAIVE_EXPECTS = ("JSON objects with string fields 'system' ('SYSTEM: ...' with the functions as JSON) and 'chat' "
                  "('USER: ... ASSISTANT: ...')")
_TURN = re.compile(r"(USER|ASSISTANT|FUNCTION RESPONSE):")
_ROLES = {"USER": "user", "ASSISTANT": "assistant", "FUNCTION RESPONSE": "tool"}
_QUOTED_ARGS = re.compile(r"""^\{\s*"name"\s*:\s*"(?P<name>[^"]+)"\s*,\s*"arguments"\s*:\s*'(?P<args>.*)'\s*\}$""",
                          re.DOTALL)


def glaive_row(row: Mapping[str, object]) -> ParsedRow:
    """The prompt up to the first assistant turn, that turn's text as the answer, and the tools."""
    system, chat = row.get("system"), row.get("chat")
    if not isinstance(system, str) or not isinstance(chat, str):
        raise RowSkip("missing string field 'system' or 'chat'")
    system_text, functions = _system(system)
    turns = _turns(chat)
    first = next((i for i, m in enumerate(turns) if m["role"] == "assistant"), None)
    context = turns if first is None else turns[:first]
    if not any(m["role"] == "user" and m["content"].strip() for m in context):
        raise RowSkip("no USER turn before the first ASSISTANT turn")
    messages = ([{"role": "system", "content": system_text}] if system_text else []) + context
    answer = assistant_text(turns[first]) or None if first is not None else None
    return ParsedRow(messages, answer, normalise_tools(functions) if functions else None)


def _system(text: str) -> tuple[str, list[Any]]:
    """The system message and the function docs that follow it (consecutive JSON objects)."""
    text = text.strip().removeprefix("SYSTEM:").strip()
    start = text.find("{")
    if start < 0:
        return text, []
    head, rest, functions = text[:start].strip(), text[start:], []
    decoder = json.JSONDecoder()
    while rest.strip():
        try:
            function, end = decoder.raw_decode(rest.strip())
        except json.JSONDecodeError:
            raise RowSkip("a function in field 'system' is not valid JSON") from None
        functions.append(function)
        rest = rest.strip()[end:]
    return head.removesuffix("-").strip(), functions


def _turns(chat: str) -> list[Message]:
    """The chat's turns in order; ``<|endoftext|>`` markers are dropped."""
    parts = _TURN.split(chat.replace("<|endoftext|>", ""))
    if parts[0].strip():
        raise RowSkip("field 'chat' does not start with 'USER:'")
    turns = []
    for marker, body in zip(parts[1::2], parts[2::2], strict=True):
        role, content = _ROLES[marker], body.strip()
        if role == "assistant" and content.startswith("<functioncall>"):
            turns.append({"role": role, "content": "", "tool_calls": [_call(content.removeprefix("<functioncall>"))]})
        else:
            turns.append({"role": role, "content": content})
    if not turns:
        raise RowSkip("field 'chat' has no 'USER:' turn")
    return turns


def _call(text: str) -> dict[str, Any]:
    """``{"name": ..., "arguments": '{...}'}`` (arguments quoted, as glaive writes it) or plain JSON."""
    text = text.strip()
    quoted = _QUOTED_ARGS.match(text)
    try:
        if quoted:
            name, arguments = quoted["name"], json.loads(quoted["args"])
        else:
            call = json.loads(text)
            name, arguments = call["name"], call.get("arguments", {})
            if isinstance(arguments, str):
                arguments = json.loads(arguments) if arguments.strip() else {}
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RowSkip("a <functioncall> is not valid JSON with a 'name'") from None
    if not isinstance(name, str) or not isinstance(arguments, dict):
        raise RowSkip("a <functioncall> is not valid JSON with a 'name'")
    return {"type": "function", "function": {"name": name, "arguments": arguments}}
