"""What a row parser gives back, and how it says a row is unusable (shared by the readers in ``esr.data``)."""

from __future__ import annotations

from typing import Any, NamedTuple

Message = dict[str, Any]
"""One chat turn: ``{"role", "content"}``, plus ``tool_calls`` (assistant) or ``tool_call_id`` / ``name`` (tool)."""
Tools = tuple[dict[str, Any], ...]
"""Function docs in the OpenAI/HF form ``{"type": "function", "function": {"name", "description", "parameters"}}``."""


class RowSkip(Exception):
    """Raised by a row parser: the row is unusable, and the message is the reason counted for it."""


class ParsedRow(NamedTuple):
    """A row as a parser reads it: the prompt's turns (no ``data.system_prompt`` yet), gold answer, tools offered."""

    messages: list[Message]
    answer: str | None
    tools: Tools | None = None
