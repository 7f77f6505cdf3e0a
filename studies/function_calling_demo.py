"""Summarise the function-calling demo (configs/function-calling.yaml) into studies/results/function_calling_demo.*

The demo trains Qwen2.5-Coder-0.5B-Instruct from the 1.5B on BFCL live_simple + live_multiple questions and
evaluates bfcl:simple every ``eval.every`` steps. "Before" is the base student evaluated with ``esr eval`` on the same
task (its first ``eval.limit`` problems are the ones the run evaluates; greedy, same token cap), "after" each row of
the run's ``eval/history.jsonl``. Figures are read from the run's files, never typed.

    python studies/function_calling_demo.py runs/function-calling-demo runs/function-calling-demo-base-eval
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

RESULTS = Path(__file__).resolve().parent / "results"
"""Where the summary goes (``--results`` moves it, e.g. for a trial on a smoke run)."""


def base_figures(base_dir: Path, limit: int) -> dict[str, Any]:
    """Name / full accuracy and parse rate of the base student on its first ``limit`` problems (greedy: 1 sample)."""
    rows = [json.loads(line) for line in (base_dir / "samples.jsonl").read_text().splitlines() if line.strip()]
    rows = rows[:limit]
    mean = lambda key: sum(float(r[key]) for r in rows) / len(rows)
    return {"step": 0, "n_problems": len(rows), "accuracy": mean("correct"), "name_accuracy": mean("name_correct"),
            "parse_rate": mean("parsed")}


def summarise(run_dir: Path, base_dir: Path) -> dict[str, Any]:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    history = [json.loads(line) for line in (run_dir / "eval" / "history.jsonl").read_text().splitlines()
               if line.strip()] if (run_dir / "eval" / "history.jsonl").is_file() else []
    limit = config["eval"]["limit"]
    keys = ("step", "n_problems", "accuracy", "name_accuracy", "parse_rate")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "config": "configs/function-calling.yaml", "task": config["eval"]["task"],
        "train_source": config["data"]["source"], "steps_done": len(metrics),
        "kl_by_step": [round(m["kl"], 4) for m in metrics if "kl" in m],
        "evals": [base_figures(base_dir, limit), *({k: row[k] for k in keys if k in row} for row in history)],
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Function-calling demo ({result['config']})", "",
             f"Trained on `{result['train_source']}` for {result['steps_done']} steps; evaluated on "
             f"`{result['task']}` (a demo split: disjoint BFCL categories). Step 0 is the base student.", "",
             "| step | problems | name accuracy | full accuracy | parse rate |", "|---|---|---|---|---|"]
    for e in result["evals"]:
        lines.append(f"| {e['step']} | {e['n_problems']} | {e['name_accuracy']:.3f} | {e['accuracy']:.3f} "
                     f"| {e['parse_rate']:.3f} |")
    lines += ["", f"Mean KL per step: {result['kl_by_step']}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("base_eval", type=Path)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = summarise(args.run, args.base_eval)
    args.results.mkdir(exist_ok=True)
    (args.results / "function_calling_demo.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "function_calling_demo.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
