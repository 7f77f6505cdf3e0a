"""Where a run keeps its checkpoints and what a checkpoint folder holds: layout only, no torch, no training.

A run folder has ``checkpoints/step-NNNNNN/`` (NNNNNN = completed steps, zero-padded to at least 6 digits). Each
step folder is a plain Hugging Face folder with the trainer's own state tucked into ``trainer/``:

    step-000010/
      adapter_config.json + adapter_model.safetensors     LoRA: peft's AutoPeftModelForCausalLM.from_pretrained
      or config.json + model.safetensors + tokenizer     full: transformers' AutoModelForCausalLM.from_pretrained
      config.yaml                                         the resolved esr run config (how these weights were made)
      trainer/
        trainer_state.pt           optimizer, scheduler and RNG states (tensors and plain data: loaded weights_only)
        trainer_state.json         step and bookkeeping, human-readable
        extrapolator.safetensors   theta_base of EffOPD extrapolation (only with optim.extrapolate.enabled)

so ``push_to_hub`` of a step folder uploads a model (or adapter), never optimizer state. Checkpoints written
before ``trainer/`` existed (the "old layout") hold the three trainer files beside the weights; they still load:
`trainer_files` points at wherever the trainer state is.

Analysis, evaluation and reports read checkpoints through this module, so they need not import ``esr.train``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CHECKPOINTS = "checkpoints"
"""The folder under a run folder that holds the ``step-NNNNNN`` folders."""
TRAINER = "trainer"
"""The sub-folder of a step folder that holds what only the trainer reads."""

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_WEIGHTS = "model.safetensors"
MODEL_WEIGHTS_INDEX = "model.safetensors.index.json"
"""Written instead of ``model.safetensors`` when transformers shards big weights (``model-0000i-of-0000n``)."""
RUN_CONFIG = "config.yaml"

TRAINER_STATE = "trainer_state.pt"
TRAINER_STATE_JSON = "trainer_state.json"
EXTRAPOLATOR_STATE = "extrapolator.safetensors"

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """The folder of the checkpoint after ``step`` completed steps (it may not exist)."""
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoint folders of a run, lowest step first (half-written ``.tmp-*`` and set-aside ``.old-*``
    folders are not checkpoints)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(steps)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def trainer_dir(folder: Path) -> Path:
    """Where a new checkpoint's trainer state is written: ``<step folder>/trainer``."""
    return Path(folder) / TRAINER


def is_old_layout(folder: Path) -> bool:
    """Whether a step folder was written before ``trainer/`` existed (trainer state beside the weights)."""
    folder = Path(folder)
    return not (folder / TRAINER).is_dir() and (folder / TRAINER_STATE_JSON).is_file()


def trainer_files(folder: Path) -> Path:
    """The folder holding a checkpoint's trainer state, in either layout: ``trainer/``, or the step folder itself
    for an old-layout checkpoint."""
    folder = Path(folder)
    return folder if is_old_layout(folder) else folder / TRAINER


def is_adapter(folder: Path) -> bool:
    """Whether a folder holds a PEFT adapter (a LoRA checkpoint) rather than whole model weights."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def model_weight_files(folder: Path) -> list[Path]:
    """The files holding a full checkpoint's model weights, picked by name: ``model.safetensors``, or the shards its
    index lists. Other ``*.safetensors`` in the folder (an old layout's ``extrapolator.safetensors``) are not
    weights. Empty when there are none."""
    folder = Path(folder)
    index = folder / MODEL_WEIGHTS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in shards]
    single = folder / MODEL_WEIGHTS
    return [single] if single.is_file() else []
