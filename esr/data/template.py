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
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

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


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt text a model continues: its chat template when it has one, else the plain template.

    Plain template (for base models), chosen so the answer follows naturally and no special token is written:

        [system text, blank line]            only when there is a system message
        Question: <user text>                one user turn
        Answer:

    With several turns (or an assistant turn): ``User: ...`` / ``Assistant: ...`` lines, ending with ``Assistant:``.
    The text ends without a trailing space, because BPE tokenizers fold the space into the first answer token.
    """
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
        return text
    return _render_plain(messages)


def _render_plain(messages: Sequence[Mapping[str, str]]) -> str:
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
    kept = [p for p in prompts if any(m["content"].strip() for m in p.messages if m["role"] != "system")]
    n_empty = len(prompts) - len(kept)
    bos = None if has_chat_template(tokenizer) else default_bos_id(tokenizer)
    texts = [render_prompt(tokenizer, p.messages) for p in kept]
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
