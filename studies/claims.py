"""Do the ESR paper's claims hold at small scale? One resumable study: arms x pair, evaluated the same way.

Each arm is an ordinary esr run (same seed, steps, batch and prompts; only the horizon, the token selection or the
optimizer differ) with held-out GSM8K-test evaluation every ``--eval-every`` steps. Then, per arm, the cascade
analysis (per-position KL of the base and the trained student on held-out prompts, inside vs beyond N) and, across
arms, the modes analysis (response lengths and sub-mode commitment on top-KL tokens), once every arm of the pair is
trained (``--modes-now``: over the arms trained so far). Everything lands in one folder per pair; a stopped study
continues where it stopped (finished arms are skipped, a cut run resumes from its last checkpoint, finished analyses
are kept), arms can be run a few at a time, and the summary always covers every trained arm, so the study can span
sessions:

    python studies/claims.py --pair quickstart          # Qwen2.5-Coder 0.5B <- 1.5B, same tokenizer
    python studies/claims.py --pair xfamily             # SmolLM2-135M <- Qwen2.5-Coder-0.5B, aligned-exact
    python studies/claims.py --pair quickstart --arms esr-100 full-512    # a subset, in this order
    python studies/claims.py --pair quickstart --name quickstart-lr5e-5 --lr 5e-5 --arms esr-100 full-512
                                                        # a variant: its own folder and summary
    python studies/claims.py --pair tiny --steps 2 ...  # tiny random models: checks the script (tests use it)

Outputs: ``<out>/<arm>/`` run folders (with ``eval/`` and ``analysis/``), ``<out>/base-eval`` (step 0),
``<out>/modes/``, and the summary ``<results>/<name>.json`` + ``.md`` + plots that RESULTS.md quotes (``<out>`` is
``studies/runs/<name>``, the name is the pair's unless ``--name`` gives another).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from claims_summary import summarize_pair, write_summary  # noqa: E402

from esr.analysis.cascade import run_cascade  # noqa: E402
from esr.analysis.modes import run_modes  # noqa: E402
from esr.config import Config, load_config  # noqa: E402
from esr.eval.runner import evaluate  # noqa: E402
from esr.eval.tasks import make_task  # noqa: E402
from esr.models import load_model  # noqa: E402
from esr.train import train  # noqa: E402

log = logging.getLogger("studies.claims")

PAIRS = {
    "quickstart": ("configs/quickstart.yaml", []),
    "xfamily": ("configs/quickstart-xfamily.yaml", []),
    "tiny": ("configs/smoke.yaml", ["data.max_prompt_tokens=512"]),
}
"""pair -> (base config, overrides). `tiny` is for tests: random 2-layer models with the SmolLM2 tokenizer."""


def arm_overrides(n: int, T: int, steps: int) -> dict[str, list[str]]:
    """The study's arms: name -> config overrides. Same seed, steps, batch, prompts and lr in every arm."""
    return {
        f"esr-{n}": ["rollout.horizon=esr", f"rollout.n={n}"],
        f"esr-{n // 2}": ["rollout.horizon=esr", f"rollout.n={n // 2}"],
        f"full-{T}": ["rollout.horizon=full"],
        "topd-0.1": ["rollout.horizon=ratio", "rollout.rho=0.1"],
        # POPD: from N/2, growing by N/2 every eighth of the run (reaches about 4.5 N by the end)
        "popd": ["rollout.horizon=progressive", f"rollout.h0={n // 2}", f"rollout.dh={n // 2}",
                 f"rollout.every={max(1, steps // 8)}"],
        f"full-top-kl-{n}": ["rollout.horizon=full", "loss.select=top-kl-n", f"loss.select_n={n}"],
        f"esr-{n}-effopd": ["rollout.horizon=esr", f"rollout.n={n}", "optim.extrapolate.enabled=true"],
    }


def study_config(args: argparse.Namespace, arm: list[str]) -> Config:
    base, pair_overrides = PAIRS[args.pair]
    common = [
        f"name={args.pair}", f"seed={args.seed}", "data.source=gsm8k", f"data.path={args.train_data}",
        f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"train.lr={args.lr}",
        f"train.checkpoint_every={args.eval_every}", f"rollout.max_new_tokens={args.T}",
        f"eval.every={args.eval_every}", "eval.task=gsm8k", f"eval.path={args.test_data}",
        f"eval.limit={args.eval_limit}", f"eval.max_new_tokens={args.eval_tokens}",
        f"eval.batch_size={args.eval_batch}",
    ]
    return load_config(REPO / base, [*pair_overrides, *common, *arm, *args.set])


def done(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def trained(run_dir: Path, steps: int) -> bool:
    """Whether an arm's run has logged all its steps and its last evaluation."""
    return logged_steps(run_dir) >= steps and (run_dir / "eval" / "best.json").is_file()


def modes_cover(path: Path, arms: list[str]) -> bool:
    """Whether a finished modes analysis (``path``) has a row for each of ``arms`` (rows are named ``<arm>/<ckpt>``);
    an arm trained since it ran makes the study run it again, over all of them (sampling only the new arm: run_modes
    keeps the rows it already has)."""
    if not done(path):
        return False
    names = {row["name"].split("/")[0] for row in json.loads(path.read_text())["rows"]}
    return set(arms) <= names


def run_arm(name: str, cfg: Config, out: Path, args: argparse.Namespace) -> None:
    """Train (or resume, or skip when finished), then the cascade analysis when the pair shares a tokenizer."""
    run_dir = out / name
    if not trained(run_dir, cfg.train.steps):
        log.info("arm %s: training (%d of %d steps logged; a cut run resumes from its last checkpoint)", name,
                 logged_steps(run_dir), cfg.train.steps)
        t0 = time.perf_counter()
        train(cfg, run_dir, resume=(run_dir / "config.yaml").is_file(), progress=args.progress)
        log.info("arm %s: trained in %.0f s", name, time.perf_counter() - t0)
    if args.pair != "xfamily" and not done(run_dir / "analysis" / "cascade.json"):
        run_cascade(run_dir, rollouts=args.cascade_rollouts, max_new_tokens=args.T, n=args.n,
                    progress=args.progress)
    gc.collect()


def evaluate_model(spec: str, cfg: Config, out_dir: Path, args: argparse.Namespace) -> None:
    """Step-0 reference: the base student (and, with --teacher-eval, the teacher) on the same held-out problems."""
    if done(out_dir / "summary.json"):
        return
    model, tokenizer = load_model(spec)
    e = cfg.eval
    evaluate(model, tokenizer, make_task(e.task, path=e.path), n=e.n, temperature=e.temperature, limit=e.limit,
             max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, seed=0, out_dir=out_dir,
             progress=args.progress)
    del model
    gc.collect()


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", choices=sorted(PAIRS), default="quickstart")
    ap.add_argument("--arms", nargs="*", help="a subset of the arms, by name (default: all)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4, help="the quickstart's (64 rollouts; the paper: 5e-5 x 3200)")
    ap.add_argument("--n", type=int, default=100, help="ESR's N (the N/2 arm is derived)")
    ap.add_argument("--T", type=int, default=512, help="full-rollout length and the cap of every horizon")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=40, help="GSM8K test problems (the first ones, fixed)")
    ap.add_argument("--eval-tokens", type=int, default=320)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--cascade-rollouts", type=int, default=16)
    ap.add_argument("--teacher-eval", action="store_true", help="also evaluate the teacher (slow: the larger model)")
    ap.add_argument("--modes-now", action="store_true",
                    help="run the modes analysis over the arms trained so far (default: once every arm is trained)")
    ap.add_argument("--train-data", default=str(REPO.parent / "shared/data/gsm8k/train.jsonl"))
    ap.add_argument("--test-data", default=str(REPO.parent / "shared/data/gsm8k/test.jsonl"))
    ap.add_argument("--name", help="the study's name: its folder studies/runs/<name> and its summary "
                    "<results>/<name>.{md,json,png} (default: the pair; e.g. quickstart-lr5e-5 for a variant)")
    ap.add_argument("--out", help="study folder (default studies/runs/<name>)")
    ap.add_argument("--results", default=str(REPO / "studies/results"), help="where the summary goes")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides for every arm (key=value)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap, ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    all_arms = arm_overrides(args.n, args.T, args.steps)
    names = args.arms or list(all_arms)
    unknown = [a for a in names if a not in all_arms]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; the arms are {list(all_arms)}")
    study_name = args.name or args.pair
    out = Path(args.out or REPO / "studies/runs" / study_name)
    out.mkdir(parents=True, exist_ok=True)
    pair_arms = list(all_arms)
    if args.pair == "xfamily":  # score-based selection needs one vocabulary (esr.train.scores)
        pair_arms = [a for a in pair_arms if "top-kl" not in a]
        names = [a for a in names if "top-kl" not in a]
    cfgs = {a: study_config(args, all_arms[a]) for a in names}  # every config checked before any compute
    # The summary and the modes analysis cover every arm of the pair, whichever subset this invocation runs.
    (out / "study.json").write_text(json.dumps({"argv": sys.argv if argv is None else argv, "arms": pair_arms,
                                                "ran": names, "args": vars(args)}, indent=2, default=str))

    first = cfgs[names[0]]
    evaluate_model(first.student.name, first, out / "base-eval", args)
    if args.teacher_eval:
        evaluate_model(first.teacher.name, first, out / "teacher-eval", args)
    for name in names:
        run_arm(name, cfgs[name], out, args)
        write_summary(summarize_pair(out, pair_arms, args.pair), Path(args.results), study_name)  # partial too
    ready = [a for a in pair_arms if trained(out / a, args.steps)]  # this invocation's arms and earlier ones
    waiting = [a for a in pair_arms if a not in ready]
    if args.pair != "xfamily" and waiting and not args.modes_now:
        log.info("modes analysis: runs once every arm is trained (or with --modes-now); waiting for %s",
                 ", ".join(waiting))
    elif args.pair != "xfamily" and ready and not modes_cover(out / "modes" / "modes.json", ready):
        log.info("modes analysis over %s", ", ".join(ready))
        run_modes([out / a for a in ready], out / "modes", rollouts=args.cascade_rollouts, max_new_tokens=args.T,
                  progress=args.progress)
    summary = summarize_pair(out, pair_arms, args.pair)
    write_summary(summary, Path(args.results), study_name)
    return summary


if __name__ == "__main__":
    main()
