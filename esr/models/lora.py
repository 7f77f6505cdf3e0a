"""LoRA adapters through peft: wrap a model, list and count what trains, save the adapter.

A LoRA run trains only the low-rank matrices, so the optimizer should see `trainable_parameters(model)` and a
checkpoint is just the adapter (`save_lora(model, dir)`), which `load_model(dir)` loads back onto its base.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence the FutureWarning transformers 5 raises when peft (0.21) reads ``model.is_gradient_checkpointing``
    while wrapping a model: it is peft's call, not the user's, and it printed once per loaded model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        yield


def apply_lora(model: PreTrainedModel, r: int, alpha: int, dropout: float, targets: str) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters; only the adapters are trainable afterwards.

    `targets` is `"all-linear"` (every linear layer except the output head, peft's own rule) or comma-separated
    module names such as `"q_proj,v_proj"`. Scaling is alpha / r; new adapters start as an exact no-op (B = 0).
    """
    if r <= 0 or alpha <= 0 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA needs r > 0, alpha > 0 and 0 <= dropout < 1; got r={r}, alpha={alpha}, "
                         f"dropout={dropout}")
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise ValueError("LoRA targets is empty: use 'all-linear' or module names like 'q_proj,v_proj'")
    target_modules: str | list[str] = "all-linear" if names == ["all-linear"] else names
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        bias="none", task_type="CAUSAL_LM")
    try:
        with quiet_peft():
            return get_peft_model(model, config)
    except ValueError as err:
        if target_modules == "all-linear":
            raise
        raise ValueError(f"LoRA targets {names} do not all match modules of {type(model).__name__}; its linear "
                         f"layers are named: {', '.join(_linear_names(model))}") from err


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) for every parameter that requires grad: what the optimizer should be given."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts; tied weights (shared embedding and head) count once."""
    params = list(model.parameters())  # parameters() yields a shared tensor only once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_lora(model: PeftModel, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
              base: str | None = None) -> None:
    """Save only the adapter (and its config naming the base spec) so that `load_model(folder)` restores it.

    `save_embedding_layers=False`: peft's default ("auto") looks the base up on the hub to see whether the vocabulary
    was resized, a network call that fails or stalls offline; esr never resizes the vocabulary. `state_dict`: the
    adapter's tensors when the model's own are sharded (named as in `model.named_parameters()`). `base`: what
    `adapter_config.json` records as `base_model_name_or_path` instead of the spec the model was loaded from (a
    checkpoint records a base plain `from_pretrained` can find: `esr.models.load.resolvable_base`).
    """
    configs = list(model.peft_config.values())
    loaded_from = [c.base_model_name_or_path for c in configs]
    try:
        if base is not None:
            for c in configs:
                c.base_model_name_or_path = base
        model.save_pretrained(str(folder), save_embedding_layers=False, state_dict=state_dict)
    finally:
        for c, spec in zip(configs, loaded_from, strict=True):
            c.base_model_name_or_path = spec


def _linear_names(model: torch.nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def merge_lora(model: PeftModel) -> PreTrainedModel:
    """The base model with every adapter folded into its weights, W <- W + (alpha / r) B A, and the LoRA layers
    removed: a plain transformers model whose forward equals the adapted one's (to float rounding)."""
    with quiet_peft():
        return model.merge_and_unload()
