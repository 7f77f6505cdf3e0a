"""Models: load any spec (zoo preset, `random:<preset>`, folder, adapter folder, hub id), zoo presets, LoRA."""

from esr.models import zoo
from esr.models.load import ModelSpecError, load_model, load_tokenizer
from esr.models.lora import apply_lora, count_parameters, save_lora, trainable_parameters

__all__ = [
    "ModelSpecError",
    "apply_lora",
    "count_parameters",
    "load_model",
    "load_tokenizer",
    "save_lora",
    "trainable_parameters",
    "zoo",
]
