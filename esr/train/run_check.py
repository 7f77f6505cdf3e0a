"""``esr check RUN``: the state of a run folder's checkpoints and metrics file, and what ``esr train --resume``
would do with them, without changing anything.

Each checkpoint is verified as a resume verifies it (``esr.train.verify``), except that no model is built: instead
of the model's weight names and shapes, a checkpoint's are compared with those most of the run's checkpoints hold.
Folders a resume skips are listed too (``.damaged-*`` set aside earlier, half-written ``.tmp-*``, ``.old-*`` kept
while a step was re-saved), and ``metrics.jsonl`` (its steps, a torn last line, the steps a resume would redo).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from esr.config import load_config
from esr.errors import EsrError
from esr.models.checkpoints import CHECKPOINTS, list_checkpoints
from esr.models.files import DamagedFileError, weight_shapes
from esr.train.run_folder import RunFolderError
from esr.train.verify import Problem, ResumePlan, logged_steps, plan_resume, verify_checkpoint


@dataclass
class RunCheck:
    """What ``check_run`` found: (label, verdict) lines, whether anything makes a resume fall back or stop, and
    the resume plan."""

    run_dir: Path
    lines: list[tuple[str, str]] = field(default_factory=list)
    damaged: bool = False
    plan: ResumePlan | None = None

    def report(self) -> str:
        width = max(len(label) for label, _ in self.lines)
        return "\n".join(f"{label:<{width}}  {verdict}" for label, verdict in self.lines)

    @property
    def exit_code(self) -> int:
        """0: everything a resume reads is intact; 1: a resume would fall back, start over or stop."""
        return 1 if self.damaged else 0


def check_run(run_dir: Path) -> RunCheck:
    """Verify every checkpoint and the metrics file of ``run_dir``; read only."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunFolderError(f"{run_dir} is not a run folder (no config.yaml); give the folder `esr train --out` "
                             "wrote")
    check = RunCheck(run_dir)
    try:
        load_config(run_dir / "config.yaml")
        check.lines.append(("config.yaml", "ok"))
    except EsrError as e:
        check.lines.append(("config.yaml", f"UNUSABLE: {e}"))
        check.damaged = True

    checkpoints = list_checkpoints(run_dir)
    odd = _odd_ones_out(checkpoints)
    problems = {folder: verify_checkpoint(folder) or odd.get(folder, []) for folder in checkpoints}
    for folder in checkpoints:
        found = problems[folder]
        verdict = "ok" if not found else ("DAMAGED: " if found[0].damaged else "DOES NOT FIT: ") + found[0].message
        check.lines.append((f"{CHECKPOINTS}/{folder.name}", verdict + _more(found)))
    check.lines += _leftovers(run_dir)
    plan = plan_resume(run_dir, problems.__getitem__)
    check.plan, check.damaged = plan, check.damaged or bool(plan.passed)
    check.lines.append(("metrics.jsonl", _metrics(run_dir)))
    check.lines.append(("esr train --resume", _resume(plan)))
    return check


def _more(found: list[Problem]) -> str:
    return f" (and {len(found) - 1} more problem{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""


def _odd_ones_out(checkpoints: list[Path]) -> dict[Path, list[Problem]]:
    """Checkpoints whose weight names or shapes differ from those most of the run's checkpoints hold (no model is
    built here to compare with); those whose weights cannot be read are verify_checkpoint's to report."""
    shapes: dict[Path, frozenset[tuple[str, tuple[int, ...]]]] = {}
    for folder in checkpoints:
        try:
            shapes[folder] = frozenset(weight_shapes(folder).items())
        except DamagedFileError:
            continue
    if not shapes:
        return {}
    common, n = Counter(shapes.values()).most_common(1)[0]
    odd = {}
    for folder, own in shapes.items():
        if own != common and n >= 2:
            key = sorted(name for name, _ in own ^ common)[0]
            odd[folder] = [Problem(f"{folder}'s weights differ from those most of the run's checkpoints hold "
                                   f"(e.g. {key})", False)]
    return odd


def _leftovers(run_dir: Path) -> list[tuple[str, str]]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return [(CHECKPOINTS, "none yet")]
    lines = []
    for p in sorted(root.glob("step-*.*")):
        label = f"{CHECKPOINTS}/{p.name}"
        if ".damaged-" in p.name:
            lines.append((label, "set aside as damaged by an earlier resume (kept for you; resume never reads it)"))
        elif ".tmp-" in p.name:
            lines.append((label, "half-written by a crash; the next resume deletes it"))
        elif ".old-" in p.name:
            final = p.with_name(p.name.split(".old-")[0])
            lines.append((label, "kept while its step was re-saved; the next resume "
                                 + ("deletes it" if final.exists() else f"puts it back as {final.name}")))
    return lines


def _metrics(run_dir: Path) -> str:
    steps, torn = logged_steps(run_dir)
    if not steps and not torn:
        return "no steps logged"
    what = f"{len(steps)} steps logged" + (f", {steps[0]}..{steps[-1]}" if steps else "")
    repeated = len(steps) - len(set(steps))
    if repeated:
        what += f", {repeated} logged twice"
    if torn:
        what += "; the last line is torn (a crash mid-write; the next resume drops it)"
    return what


def _resume(plan: ResumePlan) -> str:
    if plan.refusal is not None:
        return f"would stop: {plan.refusal.message}"
    aside = "".join(f"would set aside {folder.name}; " for folder, _ in plan.passed)
    where = (f"would resume from {plan.chosen.name} (step {plan.start})" if plan.chosen is not None
             else "would start again from step 0 (no intact checkpoint)")
    return f"{aside}{where}, redoing {plan.redo} step{'' if plan.redo == 1 else 's'}"
