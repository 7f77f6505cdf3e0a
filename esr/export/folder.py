"""``esr export``: a checkpoint as a folder that runs without esr.

    OUT/
      model.safetensors + config.json        --merge, or a full fine-tuning run: AutoModelForCausalLM, vLLM
      or adapter_model.safetensors + adapter_config.json      LoRA without --merge: peft's AutoPeftModelForCausalLM
      tokenizer.json, tokenizer_config.json, chat_template.jinja        the student's tokenizer and chat template
      generation_config.json                 eos_token_id: the ids that ended the run's rollouts (run.json)
      README.md                              the model card (esr.export.card)

Merging folds each adapter into its base weight, W <- W + (alpha / r) B A, in float32; ``dtype`` then casts what is
saved. The folder is written as ``.OUT.tmp-<pid>`` beside OUT and renamed into place when complete, so an export
that fails leaves no half-written OUT.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import GenerationConfig

from esr.export.card import model_card, run_facts
from esr.export.source import ExportError, Source, pick_checkpoint
from esr.models import load_model
from esr.models.checkpoints import ADAPTER_CONFIG
from esr.models.lora import merge_lora, save_lora
from esr.rollout.eos import eos_token_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``--dtype`` choices: the precision of the saved weights (float32, the trainer's, by default)."""


@dataclass(frozen=True)
class Exported:
    """What ``export_checkpoint`` wrote: the folder, the checkpoint it came from, full weights or an adapter."""

    folder: Path
    source: Source
    merged: bool
    dtype: str


def export_checkpoint(path: Path, out: Path, *, merge: bool = False, dtype: str = "float32") -> Exported:
    """Export the checkpoint ``path`` names (``esr.export.source.pick_checkpoint``) into the new folder ``out``.
    LoRA checkpoints give the adapter, or with ``merge`` the merged full weights; full fine-tuning runs always give
    full weights. ``ExportError`` when ``out`` holds anything, or the checkpoint is none or damaged."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not empty: give a new folder to --out (esr never overwrites one)")
    source = pick_checkpoint(path)
    facts = run_facts(source.checkpoint, source.run_dir)
    model, tokenizer = load_model(str(source.checkpoint))
    merged = merge or not source.lora
    base = _adapter_base(source.checkpoint) if source.lora else None
    if isinstance(model, PeftModel) and merged:
        model = merge_lora(model)
    model = model.to(DTYPES[dtype])
    generation = _generation_config(model, tokenizer, source.run_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if merged:
            model.config.dtype = DTYPES[dtype]
            model.generation_config = generation
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            save_lora(model, tmp, base=base)
            generation.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        card = model_card(facts, merged=merged, dtype=dtype, base_path=base, chosen=f"checkpoint {source.why}")
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"could not write {out}: {e.strerror or e}. Nothing was kept; free disk space or fix the "
                          "folder's permissions and export again") from e
    return Exported(out, source, merged, dtype)


def _adapter_base(checkpoint: Path) -> str | None:
    """``base_model_name_or_path`` as the checkpoint recorded it (a folder ``from_pretrained`` finds, or a hub id)."""
    config = json.loads((checkpoint / ADAPTER_CONFIG).read_text())
    return config.get("base_model_name_or_path") if isinstance(config, dict) else None


def _generation_config(model: Any, tokenizer: Any, run_dir: Path | None) -> GenerationConfig:
    """The model's generation config with the EOS ids the run stopped its rollouts at (``run.json``; recomputed
    from the tokenizer and chat template, as the run did, when the run folder is not at hand) and its pad id, so
    ``generate`` and vLLM end an answer at the chat template's end-of-turn marker."""
    ids: list[int] | None = None
    if run_dir is not None and (run_dir / "run.json").is_file():
        try:
            ids = json.loads((run_dir / "run.json").read_text()).get("eos_token_ids")
        except (json.JSONDecodeError, AttributeError):
            ids = None
    if not ids:
        ids = eos_token_ids(tokenizer, model)
    base = getattr(model, "generation_config", None)
    config = GenerationConfig(**base.to_diff_dict()) if base is not None else GenerationConfig()
    config.eos_token_id = ids[0] if len(ids) == 1 else list(ids)
    config.pad_token_id = tokenizer.pad_token_id
    return config
