"""Which token ids end a rollout.

A chat model ends its answer with its template's end-of-turn marker, which is not always the tokenizer's
`eos_token` (Qwen2.5's base EOS is `<|endoftext|>`, its chat turns end with `<|im_end|>`). Missing one means
rollouts that never stop and an EOS the student never learns; so every candidate is collected here, once.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from esr.config import ConfigError

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def eos_token_ids(tokenizer: Any, model: nn.Module | None = None) -> list[int]:
    """The tokenizer's EOS, the model's generation-config EOS, and the chat template's end-of-turn tokens."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []))
    template = tokenizer.chat_template or ""
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in template and t in vocab)
    if not ids:
        raise ConfigError("the tokenizer has no EOS token: rollouts could never end. Use another tokenizer.")
    return sorted(ids)


def end_of_turn_id(tokenizer: Any) -> int:
    """The one id that ends an answer in this tokenizer's format: the chat template's end-of-turn marker when it
    has one (``<|im_end|>`` for ChatML), else the tokenizer's EOS. Cross-tokenizer scoring writes this id where the
    other model stopped."""
    template = tokenizer.chat_template or ""
    vocab = tokenizer.get_vocab()
    for marker in END_OF_TURN:
        if marker in template and marker in vocab:
            return int(vocab[marker])
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token: a stop cannot be scored. Use another tokenizer.")
    return int(tokenizer.eos_token_id)
