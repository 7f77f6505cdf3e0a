"""Models with random weights: the tiny presets (tests, smoke runs) and `random:<preset>` (real architectures).

Both are seeded inside a forked RNG, so the same name gives the same weights on every call without touching the
caller's random state.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from esr.models.zoo import (
    PRESETS,
    RANDOM_PREFIX,
    TINY,
    ZooPackageMissing,
    closest,
    preset_tokenizer,
)


def build_tiny(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A tiny preset: same weights on every call (seeded init that leaves the global RNG untouched)."""
    tiny = TINY[name]
    tokenizer = preset_tokenizer(tiny.tokenizer_from)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[tiny.model_type]
    config = config_class(
        vocab_size=-(-len(tokenizer) // 64) * 64,  # a row for every token, padded to 64 like real checkpoints
        hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size, num_hidden_layers=2,
        num_attention_heads=tiny.num_heads, num_key_value_heads=tiny.num_kv_heads, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id, **({"head_dim": tiny.head_dim} if tiny.head_dim else {}),
    )
    return _seeded_model(config, tiny.seed, name), tokenizer


def build_random(spec: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`random:<preset>`: the preset's exact architecture (config stored in this package) with seeded random
    weights, and the preset's own tokenizer. For timing on machines that lack the weights."""
    name = spec.removeprefix(RANDOM_PREFIX)
    if name not in PRESETS:
        hint = closest(name)
        raise ValueError(f"{spec!r}: `random:` takes a zoo preset ({', '.join(PRESETS)})"
                         + (f"; did you mean 'random:{hint}'?" if hint in PRESETS else ""))
    try:
        tokenizer = preset_tokenizer(name)
    except ZooPackageMissing as err:
        raise ZooPackageMissing(f"{spec!r} has random weights but needs {name}'s tokenizer. {err}") from err
    config = AutoConfig.for_model(**PRESETS[name].architecture)
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"{spec!r}: tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size}")
    return _seeded_model(config, 0, spec), tokenizer


def _seeded_model(config: object, seed: int, name: str) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Adapters saved from this model record the spec as their base, so `load_model(adapter_dir)` can rebuild it.
    model.config.name_or_path = name
    model.name_or_path = name
    model.eval()
    return model
