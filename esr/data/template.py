"""Turning prompts into the exact token ids a model is sampled from.

Chat models get their own chat template with the assistant turn opened (``add_generation_prompt=True``). Base models
without a chat template get a plain text template (see ``render_prompt``). The ids are what the student generates
from, so special tokens matter:

- A chat template writes its own special tokens (SmolLM2's and Qwen's start with ``<|im_start|>``, Gemma's and
  Llama-3's with their BOS), so its text is tokenised with ``add_special_tokens=False``, the convention of
  ``apply_chat_template(tokenize=True)``: the template decides, and BOS is never added twice.
- The plain template writes no special tokens, so the tokenizer's own default decides: if it would put a BOS in
  front of text (Llama, Gemma: ``add_bos_token``), that BOS is prepended once; if not (SmolLM2, Qwen), nothing is.
  Only BOS is taken from the tokenizer's defaults, never an EOS some tokenizers append.

Tools (``Prompt.tools``) are rendered by the chat template's own tools support
(``apply_chat_template(messages, tools=tools)``: Qwen2.5's lists them in its system turn and writes assistant
``tool_calls`` as ``<tool_call>`` blocks). A template that ignores ``tools`` (SmolLM2's, Gemma's: found by rendering a
probe function and looking for its name) and the plain template get the fallback form instead, with one warning per
template: the functions as JSON in the system message, after its own text::

    <system text, blank line>You can call these functions. To call one, reply with a JSON object
    {"name": <function name>, "arguments": <object>}.
    [ ...the functions as JSON... ]

and each assistant ``tool_calls`` turn written as its content followed by one ``{"name", "arguments"}`` JSON line
per call (the form BFCL's prompting mode and glaive use: the functions in the system prompt, calls as text).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from esr.data.chat import assistant_text
from esr.data.sources import DataError, Prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("esr.data")


@dataclass(frozen=True)
class TokenizedPrompts:
    """Prompts that fit the token budget and their token ids (same order), with counts of those dropped."""

    prompts: tuple[Prompt, ...]
    ids: tuple[tuple[int, ...], ...]
    """Prompt token ids, special tokens included, ready for generation (no padding)."""
    n_too_long: int
    """Prompts dropped for having more than ``max_tokens`` tokens."""
    n_empty: int = 0
    """Prompts dropped for having no text at all."""


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``render_prompt`` will use the tokenizer's chat template (else the plain template)."""
    return bool(getattr(tokenizer, "chat_template", None))


TOOLS_HEADER = ('You can call these functions. To call one, reply with a JSON object '
                '{"name": <function name>, "arguments": <object>}.\n')
_PROBE_TOOL = {"type": "function", "function": {"name": "esr_probe_function_7f3a", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}
_TOOLS_SUPPORT: dict[str, bool] = {}
"""Chat template text -> whether it renders ``tools`` (probed once per template)."""
_WARNED: set[str] = set()


def supports_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's chat template renders a ``tools`` list (a probe function's name shows up)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return False
    key = str(template)
    if key not in _TOOLS_SUPPORT:
        probe = [{"role": "user", "content": "hi"}]
        try:
            text = tokenizer.apply_chat_template(probe, tools=[_PROBE_TOOL], tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that raises on tools (jinja errors of every kind) does not support them
            text = ""
        _TOOLS_SUPPORT[key] = "esr_probe_function_7f3a" in str(text)
    return _TOOLS_SUPPORT[key]


def tools_in_text(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None) -> list[dict]:
    """The fallback form (module docstring): tools as JSON in the system message, tool calls as JSON text."""
    out = [{"role": m["role"], "content": assistant_text(m)} if m.get("tool_calls") else dict(m) for m in messages]
    if not tools:
        return out
    listing = TOOLS_HEADER + json.dumps([t.get("function", t) for t in tools], indent=2)
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content'].rstrip()}\n\n{listing}"
        return out
    return [{"role": "system", "content": listing}, *out]


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The prompt text a model continues: its chat template when it has one, else the plain template; ``tools``
    through the template's tools support, else in the fallback form (module docstring).

    Plain template (for base models), chosen so the answer follows naturally and no special token is written:

        [system text, blank line]            only when there is a system message
        Question: <user text>                one user turn
        Answer:

    With several turns (or an assistant turn): ``User: ...`` / ``Assistant: ...`` lines, ending with ``Assistant:``.
    The text ends without a trailing space, because BPE tokenizers fold the space into the first answer token.
    """
    native = has_chat_template(tokenizer) and supports_tools(tokenizer)
    if not native and (tools or any(m.get("tool_calls") for m in messages)):
        _warn_fallback(tokenizer, bool(tools))
        messages, tools = tools_in_text(messages, tools), None
    if has_chat_template(tokenizer):
        extra = {"tools": [dict(t) for t in tools]} if tools else {}
        text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True,
                                             **extra)
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
        return text
    return _render_plain(messages)


def _warn_fallback(tokenizer: PreTrainedTokenizerBase, has_tools: bool) -> None:
    key = str(getattr(tokenizer, "chat_template", None) or "plain") + getattr(tokenizer, "name_or_path", "")
    if key in _WARNED:
        return
    _WARNED.add(key)
    kind = "the chat template of" if has_chat_template(tokenizer) else "the plain template (no chat template) of"
    what = "functions" if has_tools else "tool calls"
    log.warning("%s '%s' does not render tools: the %s go into the prompt as JSON text (the system message)",
                kind, getattr(tokenizer, "name_or_path", "?"), what)


def _render_plain(messages: Sequence[Mapping[str, Any]]) -> str:
    system = [m["content"].strip() for m in messages if m["role"] == "system" and m["content"].strip()]
    turns = [m for m in messages if m["role"] != "system"]
    head = "\n".join(system) + "\n\n" if system else ""
    if len(turns) == 1 and turns[0]["role"] == "user":
        return f"{head}Question: {turns[0]['content'].strip()}\nAnswer:"
    lines = [f"{_speaker(m['role'])}: {m['content'].strip()}" for m in turns]
    return head + "\n".join([*lines, "Assistant:"])


def _speaker(role: str) -> str:
    return {"user": "User", "assistant": "Assistant"}.get(role, role.capitalize())


def default_bos_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id the tokenizer puts in front of plain text by default, or None if it adds none.

    Found by encoding a probe with and without special tokens, so it works for every tokenizer class
    (``add_bos_token`` flags, post-processors) without reading their internals.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if with_special[:1] == [bos] and bare[:1] != [bos] else None


def tokenize_prompts(
    prompts: Sequence[Prompt], tokenizer: PreTrainedTokenizerBase, max_tokens: int
) -> TokenizedPrompts:
    """Render and tokenise ``prompts``, dropping (and counting) empty ones and those over ``max_tokens`` tokens.

    BOS handling is described in the module docstring. Raises DataError when nothing is left, naming
    ``data.max_prompt_tokens``, the setting that decides it.
    """
    if max_tokens < 1:
        raise DataError(f"data.max_prompt_tokens must be at least 1, got {max_tokens}")
    if not prompts:
        raise DataError("no prompts to tokenise")
    kept = [p for p in prompts
            if any(m["content"].strip() or m.get("tool_calls") for m in p.messages if m["role"] != "system")]
    n_empty = len(prompts) - len(kept)
    bos = None if has_chat_template(tokenizer) else default_bos_id(tokenizer)
    texts = [render_prompt(tokenizer, p.messages, p.tools) for p in kept]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    fit_prompts, fit_ids, lengths = [], [], []
    for prompt, ids in zip(kept, encoded, strict=True):
        if bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        lengths.append(len(ids))
        if len(ids) <= max_tokens:
            fit_prompts.append(prompt)
            fit_ids.append(tuple(ids))
    n_too_long = len(kept) - len(fit_prompts)
    longest = max(lengths, default=0)
    if not fit_prompts:
        raise DataError(
            f"all {len(prompts)} prompts were dropped: {n_too_long} longer than data.max_prompt_tokens={max_tokens} "
            f"(longest {longest} tokens), {n_empty} empty. Raise data.max_prompt_tokens or use shorter prompts."
        )
    if n_too_long or n_empty:
        log.warning(
            "dropped %d of %d prompts: %d longer than data.max_prompt_tokens=%d (longest %d tokens), %d empty",
            n_too_long + n_empty, len(prompts), n_too_long, max_tokens, longest, n_empty,
        )
    return TokenizedPrompts(tuple(fit_prompts), tuple(fit_ids), n_too_long, n_empty)
