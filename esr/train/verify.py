"""Is a checkpoint whole, and does it fit the run? Checked file by file without loading weights into a model, so
``esr train --resume`` can fall back past a damaged checkpoint instead of dying inside torch or safetensors.

``verify_checkpoint`` checks every file a checkpoint needs: the weights (``esr.models.files``: JSON parses,
safetensors headers read and cover their files), ``trainer_state.json`` (parses, holds this folder's ``step``),
``trainer_state.pt`` (a complete zip whose CRCs match, read by torch's restricted unpickler with its tensors
memory-mapped), the extrapolator's state when the run extrapolates, and the checkpoint's ``config.yaml``. Given what
the run trains (``expected_of``), it also compares weight names and shapes and the optimizer's parameter count.

A problem is either *damage* (a file missing, cut short, unreadable: what crashes, full disks and bit flips make) or
a *misfit* (whole, readable files whose contents do not fit the run's model or settings, or hold more than esr
writes: a systematic cause, such as a changed config, must stop the resume, not restart the run from step 0).
``resume_point`` walks the checkpoints newest first and resumes from the first without problems; those it passes
are renamed ``step-N.damaged-K`` (never deleted) with a warning: a misfit newer than a checkpoint that fits counts
as damage. If no checkpoint fits but one is merely a misfit, nothing is renamed and its ``CheckpointError`` stops
the resume. If every checkpoint is damaged, the run starts again from step 0, as a run killed before its first
checkpoint does.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import PeftModel, get_peft_model_state_dict
from torch import nn

from esr.models.checkpoints import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EXTRAPOLATOR_STATE,
    MODEL_WEIGHTS,
    MODEL_WEIGHTS_INDEX,
    RUN_CONFIG,
    TRAINER_STATE,
    TRAINER_STATE_JSON,
    list_checkpoints,
    trainer_files,
)
from esr.models.files import DamagedFileError, read_json, safetensors_shapes, weight_shapes
from esr.train.checkpoint import CheckpointError, torch_reason

log = logging.getLogger("esr.train")

TRAINER_STATE_KEYS = ("optimizer", "scheduler", "rng_cpu", "rng_cuda")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint: ``message`` names the file and what is wrong; ``damaged`` is False for a
    misfit (whole files for another model or setting)."""

    message: str
    damaged: bool = True


@dataclass(frozen=True)
class Expected:
    """What a checkpoint of this run must hold: LoRA or all weights, their names and shapes (``optional``: tied
    weights a full checkpoint leaves out), how many parameters the optimizer steps, and extrapolator state."""

    lora: bool
    weights: dict[str, tuple[int, ...]]
    optional: frozenset[str]
    optimizer_params: int
    extrapolate: bool


def expected_of(model: nn.Module, optimizer: torch.optim.Optimizer, extrapolate: bool) -> Expected:
    """What ``model`` (unsharded) and ``optimizer`` make a checkpoint hold."""
    lora = isinstance(model, PeftModel)
    state = get_peft_model_state_dict(model, save_embedding_layers=False) if lora else model.state_dict()
    named = {n for n, _ in model.named_parameters()}
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - named
    return Expected(lora=lora, weights={k: tuple(v.shape) for k, v in state.items()}, optional=frozenset(tied),
                    optimizer_params=sum(len(g["params"]) for g in optimizer.param_groups), extrapolate=extrapolate)


def verify_checkpoint(folder: Path, expected: Expected | None = None) -> list[Problem]:
    """Every problem of the checkpoint ``folder``, damage first; empty when it is whole (and fits ``expected``).
    Without ``expected`` only damage is looked for (``esr check``). Reads headers and memory-maps, loads no model."""
    folder = Path(folder)
    problems = [*_weights(folder, expected), *_trainer_state(folder, expected), *_run_config(folder)]
    return sorted(problems, key=lambda p: not p.damaged)


def _damage(e: DamagedFileError) -> Problem:
    return Problem(str(e))


def _weights(folder: Path, expected: Expected | None) -> list[Problem]:
    adapter = (folder / ADAPTER_CONFIG).exists() or (folder / ADAPTER_WEIGHTS).exists()
    whole_model = (folder / MODEL_WEIGHTS).exists() or (folder / MODEL_WEIGHTS_INDEX).exists()
    if expected is not None and expected.lora and not adapter:
        if not whole_model:
            return [Problem(f"{folder / ADAPTER_WEIGHTS} is missing")]
        return [Problem(f"{folder} holds no LoRA adapter, but this run trains LoRA (train.finetune=lora)", False)]
    if expected is not None and not expected.lora and adapter:
        return [Problem(f"{folder} holds a LoRA adapter, but this run trains all weights (train.finetune=full)",
                        False)]
    try:
        shapes = weight_shapes(folder)
    except DamagedFileError as e:
        return [_damage(e)]
    if expected is None:
        return []
    if expected.lora:
        for key in sorted(shapes.keys() & expected.weights.keys()):
            if shapes[key] != expected.weights[key]:
                return [Problem(f"{folder} is an adapter for another model or LoRA setting (size mismatch for {key}: "
                                f"{list(shapes[key])} in the checkpoint, {list(expected.weights[key])} in this run); "
                                "resume with the student and lora.* it was trained with, or start a new run", False)]
        odd = sorted(shapes.keys() ^ expected.weights.keys())
        if odd:
            return [Problem(f"{folder} is an adapter for another model or LoRA setting: its LoRA weights do not "
                            f"match this run's (e.g. {odd[0]}); resume with the student and lora.* it was trained "
                            "with, or start a new run", False)]
        return []
    wrong = [k for k in sorted(shapes) if k in expected.weights and expected.weights[k] != shapes[k]]
    if wrong or not shapes.keys() & expected.weights.keys():
        return [Problem(f"{folder} holds weights of another model (e.g. {(wrong or sorted(shapes))[0]})", False)]
    missing = sorted(expected.weights.keys() - shapes.keys() - expected.optional)
    if missing:
        return [Problem(f"{folder} lacks weights for {missing[0]} (and {len(missing) - 1} more)", False)]
    return []


def _trainer_state(folder: Path, expected: Expected | None) -> list[Problem]:
    trainer = trainer_files(folder)
    problems: list[Problem] = []
    state: Any = None
    try:
        state = read_json(trainer / TRAINER_STATE_JSON)
    except DamagedFileError as e:
        problems.append(_damage(e))
    if state is not None:
        step = state.get("step") if isinstance(state, dict) else None
        own = _step_of(folder)
        if not isinstance(step, int):
            problems.append(Problem(f"{trainer / TRAINER_STATE_JSON} has no step"))
        elif own is not None and step != own:
            problems.append(Problem(f"{trainer / TRAINER_STATE_JSON} says step {step}, but its folder is "
                                    f"{folder.name}"))
    problems += _torch_state(folder, trainer / TRAINER_STATE, expected)
    if expected is not None and expected.extrapolate:
        has_file = (trainer / EXTRAPOLATOR_STATE).exists()
        if not has_file and not (isinstance(state, dict) and "extrapolator" in state):
            problems.append(Problem(f"{folder} has no extrapolation state (it was written with optim.extrapolate "
                                    "off); resume it with optim.extrapolate.enabled=false or start a new run", False))
        else:
            try:
                safetensors_shapes(trainer / EXTRAPOLATOR_STATE)
            except DamagedFileError as e:
                problems.append(_damage(e))
            if isinstance(state, dict) and "extrapolator" not in state:
                problems.append(Problem(f"{trainer / TRAINER_STATE_JSON} lacks the extrapolator's state"))
    return problems


def _torch_state(folder: Path, path: Path, expected: Expected | None) -> list[Problem]:
    """``trainer_state.pt``: a complete zip with matching CRCs, then torch's restricted unpickler (weights_only) with
    the tensors memory-mapped: the optimizer, scheduler and RNG states, for as many parameters as the run steps."""
    if not path.exists():
        return [Problem(f"{path} is missing")]
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return [Problem(f"{path} is not a complete torch file ({str(e) or type(e).__name__}; cut short by a crash or "
                        "a full disk?)")]
    if bad is not None:
        return [Problem(f"{path} is damaged: the bytes of {bad} changed after they were written (CRC mismatch)")]
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except pickle.UnpicklingError as e:
        reason = torch_reason(e)
        if "GLOBAL" in reason:
            return [Problem(f"{path} was refused: it holds more than tensors and plain data, or is damaged "
                            f"({reason}). esr did not write it; resume from an earlier checkpoint (remove {folder}) "
                            "or start a new run", False)]
        return [Problem(f"{path} is damaged ({reason})")]
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        return [Problem(f"{path} is damaged ({torch_reason(e)})")]
    lacking = [k for k in TRAINER_STATE_KEYS if not isinstance(blob, dict) or k not in blob]
    if lacking:
        return [Problem(f"{path} lacks the {lacking[0]} state")]
    if expected is not None:
        groups = blob["optimizer"].get("param_groups", []) if isinstance(blob["optimizer"], dict) else []
        n = sum(len(g.get("params", [])) for g in groups if isinstance(g, dict))
        if n != expected.optimizer_params:
            return [Problem(f"{path} holds optimizer state for {n} parameters, but this run steps "
                            f"{expected.optimizer_params}", False)]
    return []


def _run_config(folder: Path) -> list[Problem]:
    """The checkpoint's own ``config.yaml`` (how its weights were made) parses, where there is one (resume reads the
    run folder's)."""
    path = folder / RUN_CONFIG
    if not path.exists():
        return []
    try:
        data = yaml.safe_load(path.read_bytes())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        return [Problem(f"{path} is not valid YAML ({str(e).splitlines()[0]})")]
    return [] if isinstance(data, dict) else [Problem(f"{path} is not a YAML mapping")]


def _step_of(folder: Path) -> int | None:
    name = Path(folder).name
    return int(name.split("-", 1)[1]) if name.startswith("step-") and name[5:].isdigit() else None


def logged_steps(run_dir: Path) -> tuple[list[int], bool]:
    """The steps ``metrics.jsonl`` holds, in order, and whether its last line is torn (a crash mid-write)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return [], False
    steps, torn = [], False
    lines = [line for line in path.read_bytes().decode(errors="replace").splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            torn = torn or i == len(lines) - 1
    return steps, torn


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint ``step-N`` to ``step-N.damaged-K`` (the first free K): out of the way of resume
    and of the list of checkpoints, but kept."""
    k = 1
    while (aside := folder.with_name(f"{folder.name}.damaged-{k}")).exists():
        k += 1
    os.replace(folder, aside)
    return aside


@dataclass(frozen=True)
class ResumePlan:
    """What ``esr train --resume`` does with a run's checkpoints: load ``chosen`` (None: start from step 0), after
    setting aside ``passed`` (newer checkpoints with a problem, newest first, each with its first problem), and redo
    ``redo`` steps (logged or checkpointed beyond ``start``). ``refusal``: no checkpoint fits and this one is whole
    but a misfit: the run's config changed, so the resume stops with it and renames nothing."""

    chosen: Path | None
    passed: list[tuple[Path, Problem]]
    refusal: Problem | None
    start: int
    redo: int

    def summary(self) -> str:
        """One sentence: where the resume continues and how many steps it redoes."""
        where = (f"resuming from {self.chosen} (step {self.start})" if self.chosen is not None
                 else "no intact checkpoint is left, so the run starts again from step 0")
        return f"{where}: {self.redo} step{'' if self.redo == 1 else 's'} will be redone"


def plan_resume(run_dir: Path, problems_of: Callable[[Path], list[Problem]]) -> ResumePlan:
    """Walk the run's checkpoints newest first and stop at the first whose ``problems_of`` is empty."""
    passed: list[tuple[Path, Problem]] = []
    chosen = None
    for folder in reversed(list_checkpoints(run_dir)):
        problems = problems_of(folder)
        if not problems:
            chosen = folder
            break
        passed.append((folder, problems[0]))
    refusal = None if chosen is not None else next((p for _, p in passed if not p.damaged), None)
    start = (_step_of(chosen) or 0) if chosen is not None else 0
    logged, _ = logged_steps(run_dir)
    last = max([start, *logged, *(_step_of(f) or 0 for f, _ in passed)])
    return ResumePlan(chosen, passed, refusal, start, last - start)


def resume_point(run_dir: Path, expected: Expected | None) -> Path | None:
    """The checkpoint a resume loads: the newest without problems (``plan_resume``). Newer ones are set aside, each
    with a one-line warning naming the file, what is wrong, where the run resumes and how many steps it redoes; None
    (with the same warning) when every checkpoint is damaged. ``CheckpointError`` when none fits and one is whole
    (the run's config changed); then nothing is renamed."""
    plan = plan_resume(run_dir, lambda folder: verify_checkpoint(folder, expected))
    if plan.refusal is not None:
        raise CheckpointError(plan.refusal.message)
    for folder, problem in plan.passed:
        aside = set_aside(folder)
        log.warning("checkpoint %s is damaged: %s. Set aside as %s (not deleted); %s", folder.name, problem.message,
                    aside.name, plan.summary())
    return plan.chosen
