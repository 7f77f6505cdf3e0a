"""Summarise a data-mix run (``data.mix``, README "Several teachers and a data mix") from its run folder: the teachers,
each source's prompts, and per step each source's rows, scored tokens, KL and teacher seconds (``by_source`` in
metrics.jsonl), written as JSON and a Markdown table.

    python studies/mix_demo.py RUN --out studies/results/mix_demo      # -> mix_demo.json, mix_demo.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def summarise(run: Path) -> dict[str, Any]:
    """The run's mix (run.json), config name, and per step the whole batch's and each source's figures."""
    info = json.loads((run / "run.json").read_text())
    mix = info["mix"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [{"step": r["step"], "kl": r["kl"], "loss": r["loss"], "tokens_scored": r["tokens_scored"],
              "seconds": r["seconds_generate"] + r["seconds_score"] + r["seconds_train"],
              "by_source": r["by_source"]} for r in rows]
    names = list(mix["sources"])
    totals = {n: {"rows": sum(s["by_source"].get(n, {}).get("rows", 0) for s in steps),
                  "tokens_scored": sum(s["by_source"].get(n, {}).get("tokens_scored", 0) for s in steps),
                  "seconds_score": sum(s["by_source"].get(n, {}).get("seconds_score", 0.0) for s in steps)}
              for n in names}
    for n in names:
        kls = [s["by_source"][n]["kl"] for s in steps if n in s["by_source"]]
        totals[n]["kl_first"], totals[n]["kl_last"] = (kls[0], kls[-1]) if kls else (None, None)
    return {"run": str(run), "student": _config_value(run, "student"), "mix": mix, "steps": steps,
            "totals": totals}


def _config_value(run: Path, section: str) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())[section]["name"]


def markdown(summary: dict[str, Any]) -> str:
    """Tables: the sources, then KL per step and source."""
    mix, names = summary["mix"], list(summary["mix"]["sources"])
    lines = [f"# Data mix with a teacher per source: student `{summary['student']}`", "",
             "| source | teacher | weight | prompts | rows trained | tokens scored | KL step 1 -> last | teacher s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for n in names:
        src, tot = mix["sources"][n], summary["totals"][n]
        kl = "-" if tot["kl_first"] is None else f"{tot['kl_first']:.3f} -> {tot['kl_last']:.3f}"
        lines.append(f"| {n} | {src['teacher']} | {src['weight']:.2f} | {src['prompts']} | {tot['rows']} | "
                     f"{tot['tokens_scored']} | {kl} | {tot['seconds_score']:.0f} |")
    lines += ["", "| step | KL (batch) | " + " | ".join(f"KL {n} (rows)" for n in names) + " | s/step |",
              "|---:|---:|" + "---:|" * len(names) + "---:|"]
    for s in summary["steps"]:
        cells = [f"{s['by_source'][n]['kl']:.3f} ({s['by_source'][n]['rows']})" if n in s["by_source"] else "-"
                 for n in names]
        lines.append(f"| {s['step']} | {s['kl']:.3f} | " + " | ".join(cells) + f" | {s['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="path stem: writes STEM.json and STEM.md")
    args = parser.parse_args()
    summary = summarise(args.run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
