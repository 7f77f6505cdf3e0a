"""Which checkpoint ``esr export`` ships, and whether it is whole: a step folder as given, or a run folder's best
checkpoint by its evaluation during training (``eval/best.json``) when the run evaluated, else its newest.

A folder that is no checkpoint and a damaged checkpoint (``esr.train.verify``: missing, cut-short or unreadable
files) are refused with one ``ExportError`` line before any model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from esr.errors import EsrError
from esr.models.checkpoints import (
    ADAPTER_CONFIG,
    CHECKPOINTS,
    RUN_CONFIG,
    is_adapter,
    latest_checkpoint,
    list_checkpoints,
    model_weight_files,
)
from esr.train.verify import verify_checkpoint


class ExportError(EsrError, ValueError):
    """A checkpoint cannot be exported (not one, damaged, the output folder is taken, the push failed): the message
    names the folder or repo and what to do."""


@dataclass(frozen=True)
class Source:
    """The checkpoint to export, the run folder it belongs to (None for a step folder copied out of its run), and
    why this checkpoint (for a run folder: the best by eval, or the newest)."""

    checkpoint: Path
    run_dir: Path | None
    why: str

    @property
    def lora(self) -> bool:
        return is_adapter(self.checkpoint)


def pick_checkpoint(path: Path) -> Source:
    """The checkpoint ``path`` names, verified; ``ExportError`` when there is none or it is damaged."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ExportError(f"{path} is no folder: give a checkpoint (RUN/checkpoints/step-N) or a run folder")
    if (path / CHECKPOINTS).is_dir():
        checkpoint, why = _of_run(path)
        run_dir: Path | None = path
    else:
        checkpoint, why = path, "as given"
        parent = path.parent.parent
        run_dir = parent if path.parent.name == CHECKPOINTS and (parent / RUN_CONFIG).is_file() else None
    if not (checkpoint / RUN_CONFIG).is_file() or not ((checkpoint / ADAPTER_CONFIG).is_file()
                                                        or model_weight_files(checkpoint)):
        raise ExportError(f"{checkpoint} is not an esr checkpoint (it needs config.yaml and a LoRA adapter or "
                          "model*.safetensors): give RUN/checkpoints/step-N or a run folder")
    damage = [p for p in verify_checkpoint(checkpoint) if p.damaged]
    if damage:
        raise ExportError(f"checkpoint {checkpoint} is damaged: {damage[0].message}. Export an earlier checkpoint "
                          "(`esr check RUN` lists them)")
    return Source(checkpoint, run_dir, why)


def _of_run(run_dir: Path) -> tuple[Path, str]:
    """A run's best checkpoint by ``eval/best.json`` when it names one that still exists, else its newest."""
    best_file = run_dir / "eval" / "best.json"
    if best_file.is_file():
        try:
            best = json.loads(best_file.read_text())
        except json.JSONDecodeError:
            best = {}
        named = Path(str(best.get("checkpoint") or ""))
        found = [p for p in list_checkpoints(run_dir) if p.name == named.name]
        if named.name and found:
            return found[0], f"best by eval: {best.get('metric')}={best.get('value')} at step {best.get('step')}"
    newest = latest_checkpoint(run_dir)
    if newest is None:
        raise ExportError(f"{run_dir} has no checkpoint yet: train longer (train.checkpoint_every) or give a "
                          "checkpoint folder")
    return newest, "newest; the run did not evaluate during training"
