"""Compare horizon arms trained at equal rollouts (same steps, batch, prompts, seed), e.g. ``rollout.horizon=auto``
against ESR at N=100: per arm N over steps, the training KL, the tokens and FLOPs spent (the auto arm's probes
counted separately and in the total), and, when given, the held-out reverse KL of their final checkpoints from
``esr probe heldout-kl`` (mean over prompts with its bootstrap 95% interval, and the paired verdict against the
first arm), written as JSON and a Markdown table.

    esr probe heldout-kl RUN_N100 RUN_AUTO --base --prompts 32 --max-new-tokens 256 --out HK
    python studies/auto_horizon.py RUN_N100 RUN_AUTO --heldout HK/heldout_kl.json --out studies/results/auto_horizon

FLOPs are the loop's 2N-per-token estimates (``esr.train.metrics.step_flops``), a machine-independent cost; wall
times are listed too but depend on what else the machine was doing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

FLOPS = ("flops_generate", "flops_score", "flops_train", "flops_extrapolate")


def summarise_run(run: Path) -> dict[str, Any]:
    """One arm's figures from its metrics.jsonl (and auto/profile.jsonl for an auto arm)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_flops = sum(r.get(k, 0.0) for r in rows for k in FLOPS)
    probe_flops = sum(r.get("probe_flops", 0.0) for r in rows)
    probes_path = run / "auto" / "profile.jsonl"
    probes = ([json.loads(line) for line in probes_path.read_text().splitlines() if line.strip()]
              if probes_path.is_file() else [])
    kls = [r["kl"] for r in rows]
    return {
        "run": str(run), "steps": len(rows), "horizon": [r["horizon"] for r in rows],
        "kl_first3": sum(kls[:3]) / len(kls[:3]), "kl_last3": sum(kls[-3:]) / len(kls[-3:]),
        "tokens_generated": sum(r["tokens_generated"] for r in rows),
        "probe_tokens": sum(p.get("probe_tokens", 0) for p in probes),
        "flops_train": train_flops, "flops_probe": probe_flops, "flops_total": train_flops + probe_flops,
        "seconds_steps": sum(r["seconds_generate"] + r["seconds_score"] + r["seconds_train"] for r in rows),
        "seconds_probe": sum(r.get("probe_seconds", 0.0) for r in rows),
        "probes": [{k: p[k] for k in ("step", "n_before", "n", "probe_kl", "seconds") if k in p} for p in probes],
    }


def heldout_rows(path: Path) -> list[dict[str, Any]]:
    """Per target of heldout_kl.json (the reference first): its label, intervals and paired comparison."""
    data = json.loads(path.read_text())
    return [{k: t.get(k) for k in ("label", "intervals", "against_first")} for t in data["targets"]]


def _interval(iv: dict[str, Any] | None) -> str:
    return "-" if not iv or iv.get("mean") is None else f"{iv['mean']:.4f} [{iv['low']:.4f}, {iv['high']:.4f}]"


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| arm | N first -> last (min-max) | train KL first 3 -> last 3 | tokens generated | probe tokens |"
             " TFLOPs train + probe | probe share of FLOPs |", "|---|---|---|---:|---:|---:|---:|"]
    for arm in summary["arms"]:
        h = arm["horizon"]
        share = arm["flops_probe"] / arm["flops_total"] if arm["flops_total"] else 0.0
        lines.append(f"| {arm['run']} | {h[0]} -> {h[-1]} ({min(h)}-{max(h)}) | {arm['kl_first3']:.4f} -> "
                     f"{arm['kl_last3']:.4f} | {arm['tokens_generated']} | {arm['probe_tokens']} | "
                     f"{arm['flops_train'] / 1e12:.1f} + {arm['flops_probe'] / 1e12:.1f} | {100 * share:.1f}% |")
    if summary.get("heldout"):
        lines += ["", "Held-out reverse KL (mean over prompts, bootstrap 95% interval; the difference is paired on "
                  "the same prompts, against the first target):", "",
                  "| target | KL r < N | KL r >= N | KL all | difference (all) | verdict |",
                  "|---|---:|---:|---:|---:|---|"]
        for t in summary["heldout"]:
            iv, vs = t["intervals"], (t["against_first"] or {}).get("all")
            diff = "-" if vs is None else _interval({**vs, "mean": vs.get("difference", vs.get("mean"))})
            lines.append(f"| {t['label']} | {_interval(iv.get('inside'))} | {_interval(iv.get('beyond'))} | "
                         f"{_interval(iv.get('all'))} | {diff} | {'-' if vs is None else vs['verdict']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders, the reference arm first")
    ap.add_argument("--heldout", type=Path, help="heldout_kl.json of `esr probe heldout-kl` over these runs")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    summary: dict[str, Any] = {"arms": [summarise_run(r) for r in args.runs]}
    if args.heldout:
        summary["heldout"] = heldout_rows(args.heldout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
