"""Prompt data: sources (GSM8K / MATH / generic JSONL, HF datasets, reasoning-gym) and chat templating.

    prompt_set = load_prompts(cfg.data)
    batch = tokenize_prompts(prompt_set.prompts, tokenizer, cfg.data.max_prompt_tokens)
"""

from esr.data.sources import SOURCES, DataError, Prompt, PromptSet, load_prompts
from esr.data.template import TokenizedPrompts, default_bos_id, has_chat_template, render_prompt, tokenize_prompts

__all__ = [
    "SOURCES",
    "DataError",
    "Prompt",
    "PromptSet",
    "TokenizedPrompts",
    "default_bos_id",
    "has_chat_template",
    "load_prompts",
    "render_prompt",
    "tokenize_prompts",
]
