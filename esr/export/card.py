"""The model card (``README.md``) of an exported model: Hugging Face front matter and the facts of the run that
made the weights, read from the checkpoint's ``config.yaml``, its ``trainer_state.json`` and, when the checkpoint
sits in its run folder, the run's ``metrics.jsonl`` and ``eval/history.jsonl`` (rows up to the checkpoint's step).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import esr
from esr.config import Config, load_config
from esr.models.checkpoints import RUN_CONFIG, TRAINER_STATE_JSON, trainer_files

TAGS = ("esr", "distillation", "on-policy-distillation")
METRIC_KEYS = ("loss", "kl", "response_len_mean", "cut_share", "trained_share", "grad_norm", "lr")
"""The columns of the card's final-metrics table, when metrics.jsonl has them."""
LAST_ROWS = 3
EVAL_KEYS = ("accuracy", "pass@1", "name_accuracy", "parse_rate", "relaxed_accuracy", "cut_share", "length_mean")
"""The columns of the card's eval-history table besides ``eval.metric``, when the history has them."""


@dataclass(frozen=True)
class RunFacts:
    """What the card says about the run: its config, the checkpoint's step, the last metrics rows and the eval
    history up to that step (empty when the checkpoint is not in its run folder)."""

    cfg: Config
    step: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


def run_facts(checkpoint: Path, run_dir: Path | None) -> RunFacts:
    """The facts of ``checkpoint`` (verified beforehand, so its files read)."""
    cfg = load_config(checkpoint / RUN_CONFIG)
    step = int(json.loads((trainer_files(checkpoint) / TRAINER_STATE_JSON).read_text())["step"])
    if run_dir is None:
        return RunFacts(cfg, step)
    metrics = [r for r in _jsonl(run_dir / "metrics.jsonl") if r.get("step", 0) <= step]
    evals = [r for r in _jsonl(run_dir / "eval" / "history.jsonl") if r.get("step", 0) <= step]
    return RunFacts(cfg, step, metrics[-LAST_ROWS:], evals)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a torn last line from a crash
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def horizon_text(cfg: Config) -> str:
    """The rollout horizon in the paper's terms: ESR's N, the full T, or the progressive / ratio schedule."""
    r = cfg.rollout
    return {"esr": f"esr (N = {r.n} tokens)", "full": f"full (T = {r.max_new_tokens} tokens)",
            "progressive": f"progressive (H0 = {r.h0}, +{r.dh} every {r.every} steps, cap T = {r.max_new_tokens})",
            "ratio": f"ratio (rho = {r.rho} of T = {r.max_new_tokens})",
            "auto": f"auto (N chosen by KL-profile probes every {r.auto.every} steps from N = {r.n}, share "
                    f"{r.auto.share}, cap T = {r.max_new_tokens})"}[r.horizon]


def model_card(facts: RunFacts, *, merged: bool, dtype: str, base_path: str | None, chosen: str = "") -> str:
    """The card's markdown. ``merged``: full weights (library transformers) or a PEFT adapter (library peft) whose
    ``base_model_name_or_path`` is ``base_path``; ``chosen``: why this checkpoint (best by eval, newest)."""
    cfg = facts.cfg
    front = ["---", f"library_name: {'transformers' if merged else 'peft'}", "tags:", *(f"- {t}" for t in TAGS)]
    if _hub_id(cfg.student.name):
        front.append(f"base_model: {cfg.student.name}")
    front += ["pipeline_tag: text-generation", "---", ""]
    what = ("full weights (LoRA merged into the student)" if merged and cfg.train.finetune == "lora"
            else "full weights" if merged else "a LoRA adapter (PEFT)")
    lines = [
        f"# {cfg.name}: {cfg.student.name} distilled from {cfg.teacher.name}", "",
        f"On-policy distillation with esr {esr.__version__} (`pip install esr-distill`): the student "
        "samples rollouts, the teacher scores every sampled token, a token-level loss pulls the student toward the "
        f"teacher. This folder holds {what}, saved as {dtype}.", "",
        "| run | |", "|---|---|",
        f"| student | `{cfg.student.name}` |", f"| teacher | `{cfg.teacher.name}` |",
        f"| horizon | {horizon_text(cfg)} |", f"| loss | {cfg.loss.kind} |",
        f"| fine-tuning | {cfg.train.finetune}" + (f" (r = {cfg.lora.r}, alpha = {cfg.lora.alpha})"
                                                    if cfg.train.finetune == "lora" else "") + " |",
        f"| steps | {facts.step} of {cfg.train.steps}" + (f" ({chosen})" if chosen else "") + " |",
        f"| lr | {cfg.train.lr:g} |",
        f"| batch size | {cfg.train.batch_size} prompts |", f"| data | {cfg.data.source} |",
        f"| seed | {cfg.seed} |", f"| esr version | {esr.__version__} |", "",
    ]
    return "\n".join(front + lines + _metrics(facts) + _evals(facts) + _usage(merged, base_path)) + "\n"


def _hub_id(spec: str) -> bool:
    """Whether a model spec is a hub id (``org/name``) rather than a zoo preset or a local folder."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists()


def _metrics(facts: RunFacts) -> list[str]:
    if not facts.metrics:
        return ["No training metrics were found (the checkpoint was exported outside its run folder).", ""]
    keys = [k for k in METRIC_KEYS if any(k in r for r in facts.metrics)]
    out = ["## Final training metrics", "", "| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    out += [f"| {r['step']} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in facts.metrics]
    return [*out, ""]


def _evals(facts: RunFacts) -> list[str]:
    if not facts.evals:
        return []
    cfg = facts.cfg.eval
    keys = [k for k in dict.fromkeys((cfg.metric, *EVAL_KEYS)) if any(k in r for r in facts.evals)]
    out = [f"## Evaluation during training ({cfg.task}, first {cfg.limit} problems, T = {cfg.temperature})", "",
           "| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    out += [f"| {r['step']} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in facts.evals]
    return [*out, ""]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _usage(merged: bool, base_path: str | None) -> list[str]:
    if merged:
        return ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")',
                'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")', "```", "",
                "vLLM serves the folder as it is: `vllm serve PATH_OR_REPO`."]
    return ["## Use", "", "```python", "from peft import AutoPeftModelForCausalLM",
            'model = AutoPeftModelForCausalLM.from_pretrained("PATH_OR_REPO")', "```", "",
            f"`adapter_config.json` names the base as `{base_path}`. When that is a local folder (esr's zoo presets "
            "are converted once into `~/.cache/esr`), it exists only on the machine that trained the adapter: "
            "elsewhere, set `base_model_name_or_path` to a copy of the same base weights, or export with `--merge` "
            "to ship full weights that need no base."]
