"""Atomic, resumable checkpoints: writing and reading the step folders whose layout ``esr.models.checkpoints``
describes (weights at the top as a plain Hugging Face folder, trainer state in ``trainer/``). Old-layout checkpoints
(trainer state beside the weights) still resume.

A LoRA adapter records a base that ``from_pretrained`` can resolve without esr: the fp32 cache folder of a zoo
preset (a tiny preset is saved there first), the absolute path of a local folder, or the hub id.

A checkpoint is written into ``step-NNNNNN.tmp-<pid>``, fsynced, and renamed into place only when complete, so a
crash at any moment leaves either the whole new checkpoint or none of it; a leftover ``.tmp-*`` folder is ignored and
removed. Re-saving a step that exists sets the old folder aside as ``.old-<pid>`` until the new one is in place; a
crash in between leaves the old one, which resume puts back. Before a resume loads one, ``esr.train.verify`` checks
its files and falls back past a damaged one; what fails here all the same is a one-line ``CheckpointError``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from esr.config import Config, save_config
from esr.errors import EsrError
from esr.models.checkpoints import (
    ADAPTER_WEIGHTS,
    CHECKPOINTS,
    EXTRAPOLATOR_STATE,
    RUN_CONFIG,
    TRAINER_STATE,
    TRAINER_STATE_JSON,
    checkpoint_dir,
    is_old_layout,
    latest_checkpoint,
    list_checkpoints,
    model_weight_files,
    trainer_dir,
    trainer_files,
)
from esr.models.load import resolvable_base
from esr.models.lora import save_lora
from esr.train.fsdp import is_sharded, shard_optimizer_state

__all__ = [  # the layout names stay importable from here, where they used to live
    "CheckpointError", "checkpoint_dir", "is_old_layout", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
    "load_weights", "model_weight_files", "remove_partial_checkpoints", "save_checkpoint", "trainer_dir",
    "trainer_files",
]


class CheckpointError(EsrError, RuntimeError):
    """A checkpoint could not be written or does not fit the run; the message says where and why."""


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Clean up after a crash during a checkpoint write: delete ``.tmp-*`` folders (incomplete), and put back an
    ``.old-*`` folder (a complete checkpoint set aside while the same step was re-saved) whose step has none."""
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        for p in root.glob("step-*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob("step-*.old-*"):
            final = p.with_name(p.name.split(".old-")[0])
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, final)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: Config,
    state: dict[str, Any],
    extrapolator: Any = None,
    full: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write the checkpoint for ``step`` (the number of completed steps) atomically; return its folder.
    ``extrapolator`` (an ``esr.optim.Extrapolator``) adds its theta_base and alpha. ``full``: the weights and the
    optimizer state gathered whole, when the model's are sharded (``esr.train.fsdp``); written as if unsharded."""
    weights, optimizer_state = full if full is not None else (None, optimizer.state_dict())
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        _write_weights(tmp, model, tokenizer, weights)
        trainer = trainer_dir(tmp)
        trainer.mkdir()
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            trainer / TRAINER_STATE,
        )
        if extrapolator is not None:
            tensors, plain = extrapolator.state_dict()
            save_file(tensors, str(trainer / EXTRAPOLATOR_STATE))
            state = {**state, "extrapolator": plain}
        (trainer / TRAINER_STATE_JSON).write_text(json.dumps({"step": step, **state}, indent=2))
        save_config(cfg, tmp / RUN_CONFIG)
        _fsync_tree(tmp)
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        if final.exists():  # re-saving the same step (e.g. the end of a resumed run): set the old one aside first
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as e:  # OSError, or what torch.save / safetensors make of a failed write (RuntimeError, ...)
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:200]
        raise CheckpointError(f"could not write checkpoint {final}: {why}. Nothing of it was kept; {kept}. "
                              f"Free disk space (or fix the folder's permissions) and continue with "
                              f"`esr train --resume {run_dir}`") from e
    return final


def _write_weights(folder: Path, model: nn.Module, tokenizer: Any, weights: dict[str, torch.Tensor] | None) -> None:
    """The model part of a checkpoint, as a plain Hugging Face folder: the LoRA adapter (its config naming a base
    that ``from_pretrained`` finds), or all weights with config and tokenizer."""
    if isinstance(model, PeftModel):
        loaded_from = next(iter(model.peft_config.values())).base_model_name_or_path or ""
        save_lora(model, folder, state_dict=weights, base=resolvable_base(str(loaded_from)))
    else:
        model.save_pretrained(folder, safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(folder)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extrapolator: Any = None,
    *,
    weights: bool = True,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler, RNG (and the extrapolator's state) from ``folder``; return its
    trainer_state.json (from ``trainer/``, or beside the weights in an old-layout checkpoint). ``weights=False``: the
    caller loaded them already (before sharding, esr.train.fsdp); the optimizer state is then cut to this process's
    shards. Any failure is a one-line ``CheckpointError`` naming the folder (``esr.train.verify`` catches damage
    before this runs; what still fails here is reported, not raised from deep inside torch)."""
    with unreadable_as_checkpoint_error(folder):
        return _load_checkpoint(folder, model, optimizer, scheduler, extrapolator, weights)


@contextmanager
def unreadable_as_checkpoint_error(folder: Path) -> Iterator[None]:
    """Turn what torch, safetensors, json or the file system raise on a damaged checkpoint into a CheckpointError
    that names the folder and says how to go on."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, EOFError, RuntimeError,
            SafetensorError) as e:  # what torch's load_state_dict and friends make of unexpected contents
        why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{folder} could not be loaded ({type(e).__name__}: {why}). Set it aside (rename it to "
            f"{Path(folder).name}.damaged) and resume from the checkpoint before it, or start a new run") from e


def _load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, extrapolator: Any, weights: bool
                     ) -> dict[str, Any]:
    if weights:
        load_weights(folder, model)
    trainer = trainer_files(folder)  # trainer/, or the step folder itself in the old layout
    state = json.loads((trainer / TRAINER_STATE_JSON).read_text())
    if extrapolator is not None:
        if not (trainer / EXTRAPOLATOR_STATE).is_file() or "extrapolator" not in state:
            raise CheckpointError(f"{folder} has no extrapolation state (it was written with optim.extrapolate "
                                  "off); resume it with optim.extrapolate.enabled=false or start a new run")
        extrapolator.load_state_dict(load_file(trainer / EXTRAPOLATOR_STATE), state["extrapolator"])
    try:  # weights_only: tensors and plain data only; anything else is refused by torch, never unpickled
        blob = torch.load(trainer / TRAINER_STATE, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointError(
            f"{trainer / TRAINER_STATE} was refused: it holds more than tensors and plain data, or is damaged "
            f"({torch_reason(e)}). esr did not write it; resume from an earlier checkpoint (remove {folder}) or "
            "start a new run") from e
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = any(is_sharded(p) for p in params)
    optimizer.load_state_dict(shard_optimizer_state(blob["optimizer"], optimizer) if sharded else blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng_cpu"])
    if blob["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng_cuda"])
    return state


def torch_reason(error: BaseException) -> str:
    """The informative part of a torch load error, without its advice to retry with weights_only=False: the
    "size mismatch" or "unsupported GLOBAL" line when there is one, else the first sentence."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    line = next((x for x in lines if x.startswith("size mismatch") or "GLOBAL" in x), lines[0])
    return line.split(". ")[0][:300]


def load_weights(folder: Path, model: nn.Module) -> None:
    """The checkpoint's weights into ``model`` (an unsharded one): the LoRA adapter, or every weight."""
    with unreadable_as_checkpoint_error(folder):
        _load_weights(folder, model)


def _load_weights(folder: Path, model: nn.Module) -> None:
    if isinstance(model, PeftModel):
        adapter = folder / ADAPTER_WEIGHTS
        if not adapter.is_file():
            raise CheckpointError(f"{folder} holds no LoRA adapter, but this run trains LoRA (train.finetune=lora)")
        try:
            result = set_peft_model_state_dict(model, load_file(adapter))
        except RuntimeError as e:  # load_state_dict's "size mismatch for ...": another base model or lora.r
            raise CheckpointError(f"{folder} is an adapter for another model or LoRA setting ({torch_reason(e)}); "
                                  "resume with the student and lora.* it was trained with, or start a new run") from e
        # A LoRA weight the run has but the file lacks (other lora.targets) would silently stay at its init.
        bad = [k for k in (*result.unexpected_keys, *result.missing_keys) if "lora_" in k]
        if bad:
            raise CheckpointError(f"{folder} is an adapter for another model or LoRA setting: its LoRA weights do not "
                                  f"match this run's (e.g. {bad[0]}); resume with the student and lora.* it was "
                                  "trained with, or start a new run")
        return
    files = model_weight_files(folder)  # by name: an old layout's extrapolator.safetensors lies beside them
    if not files:
        raise CheckpointError(f"{folder} holds no model*.safetensors, but this run trains all weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong or not set(state) & set(own):
        raise CheckpointError(f"{folder} holds weights of another model (e.g. {(wrong or list(state))[0]})")
    missing, _ = model.load_state_dict(state, strict=False)
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    untied_missing = [k for k in missing if k not in tied]
    if untied_missing:
        raise CheckpointError(f"{folder} lacks weights for {untied_missing[0]} (and {len(untied_missing) - 1} more)")
