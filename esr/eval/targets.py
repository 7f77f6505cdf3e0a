"""What `esr eval` evaluates: one model, or every checkpoint of a run (with the untrained student first)."""

from __future__ import annotations

from pathlib import Path


def eval_targets(spec: str, *, include_base: bool = True) -> list[tuple[str, str]]:
    """(label, model spec) pairs: ``[(spec, spec)]`` for a model; for a run folder (``config.yaml`` and
    ``checkpoints/``) the student it started from (label ``base``) and each checkpoint (label ``step-NNNNNN``)."""
    folder = Path(spec).expanduser()
    if not ((folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir()):
        return [(spec, spec)]
    from esr.config import load_config
    from esr.models.checkpoints import list_checkpoints

    checkpoints = list_checkpoints(folder)
    base = [("base", load_config(folder / "config.yaml").student.name)] if include_base else []
    return base + [(p.name, str(p)) for p in checkpoints]
