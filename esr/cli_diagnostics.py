"""`esr probe ...` and `esr analyze ...`: the diagnostics that show why a horizon works for a pair. Thin: every verb is
one call into ``esr.analysis``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from esr.config.ranges import COUNT, NON_NEGATIVE, SEED, SHARE, argument, at_least

PROBE_EXAMPLES = """examples:
  esr probe kl-profile configs/quickstart.yaml --rollouts 16 --max-new-tokens 512     # per-position KL, pick N
  esr probe decay configs/quickstart.yaml --ks 0 25 50 100 200 --limit 16             # teacher from student prefixes
  esr probe decay configs/quickstart.yaml --mirror                                    # student from teacher prefixes
  esr probe heldout-kl runs/smoke --base --prompts 128                                # held-out KL vs base, 95% CIs
"""
ANALYZE_EXAMPLES = """examples:
  esr analyze cascade runs/quickstart-20261124-101500                 # KL before/after training, inside/beyond N
  esr analyze modes runs/esr-100 --against runs/full-400              # top-KL token modes, length percentiles
  esr analyze tokens runs/esr-100                                     # KL by token category and position range
"""


def add_parsers(verbs: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    probe = verbs.add_parser("probe", help="probe a student/teacher pair (kl-profile, decay) or trained runs "
                             "(heldout-kl)", epilog=PROBE_EXAMPLES, formatter_class=raw)
    kinds = probe.add_subparsers(dest="probe", required=True)
    kl = kinds.add_parser("kl-profile", help="per-position KL and entropies on student rollouts; recommends N",
                          epilog=PROBE_EXAMPLES, formatter_class=raw)
    kl.add_argument("config", help="a run config (its student, teacher and data are used)")
    kl.add_argument("--rollouts", type=argument(COUNT), default=16)
    kl.add_argument("--max-new-tokens", type=argument(COUNT), default=512)
    kl.add_argument("--share", type=argument(SHARE, float), default=0.45,
                    help="recommend N where cumulative KL reaches this share")
    kl.add_argument("--bucket", type=argument(COUNT), default=10, help="positions per bucket in the plot")
    kl.add_argument("--out", type=Path, default=Path("probes/kl-profile"))
    decay = kinds.add_parser("decay", help="teacher accuracy when continuing k-token student prefixes",
                             epilog=PROBE_EXAMPLES, formatter_class=raw)
    decay.add_argument("config", help="a run config (its student and teacher are used)")
    decay.add_argument("--ks", type=argument(at_least(0)), nargs="+", default=[0, 25, 50, 100, 200, 300])
    decay.add_argument("--task", default="gsm_symbolic")
    decay.add_argument("--limit", type=argument(COUNT), default=16)
    decay.add_argument("--n", type=argument(COUNT), default=1)
    decay.add_argument("--temperature", type=argument(NON_NEGATIVE, float), default=0.0)
    decay.add_argument("--max-new-tokens", type=argument(COUNT), default=384)
    decay.add_argument("--mirror", action="store_true", help="the student continues k-token teacher prefixes")
    decay.add_argument("--out", type=Path, default=Path("probes/decay"))
    _add_heldout_parser(kinds, raw)

    analyze = verbs.add_parser("analyze", help="analyse trained runs (cascade, modes, tokens)",
                               epilog=ANALYZE_EXAMPLES, formatter_class=raw)
    kinds = analyze.add_subparsers(dest="analysis", required=True)
    cascade = kinds.add_parser("cascade", help="per-position KL before vs after training", epilog=ANALYZE_EXAMPLES,
                               formatter_class=raw)
    cascade.add_argument("run", type=Path)
    cascade.add_argument("--n", type=argument(COUNT),
                         help="the trained window (default: the run's rollout.n under ESR)")
    modes = kinds.add_parser("modes", help="sub-mode commitment on top-KL tokens, length percentiles",
                             epilog=ANALYZE_EXAMPLES, formatter_class=raw)
    modes.add_argument("run", type=Path)
    modes.add_argument("--against", type=Path, action="append", default=[], help="another run to compare")
    modes.add_argument("--top-share", type=argument(SHARE, float), default=0.10)
    modes.add_argument("--fresh", action="store_true",
                       help="sample every model again (default: keep the rows of OUT/modes.json made the same way)")
    tokens = kinds.add_parser("tokens", help="KL by token category and position range", epilog=ANALYZE_EXAMPLES,
                              formatter_class=raw)
    tokens.add_argument("target", help="a run folder (its last checkpoint) or a model spec (then --teacher)")
    tokens.add_argument("--teacher", help="teacher spec when TARGET is a model")
    tokens.add_argument("--top", type=argument(COUNT), default=30)
    for p in (cascade, modes, tokens):
        p.add_argument("--rollouts", type=argument(COUNT), default=16)
        p.add_argument("--max-new-tokens", type=argument(COUNT), default=512)
        p.add_argument("--out", type=Path, help="output folder (default RUN/analysis)")
    for p in (kl, decay, cascade, modes, tokens):
        p.add_argument("--no-progress", action="store_true")


def _add_heldout_parser(kinds: argparse._SubParsersAction, raw: type[argparse.HelpFormatter]) -> None:
    h = kinds.add_parser("heldout-kl", help="reverse KL of trained runs to their teacher on held-out prompts, with "
                         "bootstrap 95%% intervals", epilog=PROBE_EXAMPLES, formatter_class=raw)
    h.add_argument("targets", nargs="+", metavar="TARGET",
                   help="RUN (its newest checkpoint), RUN@step-8 (that checkpoint) or RUN@base (its untrained "
                        "student); the first is the reference of the paired comparisons")
    h.add_argument("--prompts", type=argument(COUNT), default=128, help="held-out prompts (one rollout each)")
    h.add_argument("--max-new-tokens", type=argument(COUNT), help="rollout length (default: the run's)")
    h.add_argument("--split", type=argument(COUNT), help="N: inside is r < N, beyond r >= N (default: rollout.n)")
    h.add_argument("--steps", type=argument(at_least(0)), nargs="+", default=[],
                   help="measure each plain RUN at these checkpoint steps instead of its newest")
    h.add_argument("--base", action="store_true", help="measure the first run's untrained student first")
    h.add_argument("--seed", type=argument(SEED), default=1234, help="sampling seed (the same for every target)")
    h.add_argument("--out", type=Path, default=Path("probes/heldout-kl"))
    h.add_argument("--no-progress", action="store_true")


def run_probe(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.probe == "kl-profile":
        from esr.analysis.kl_profile import run_kl_profile

        result = run_kl_profile(args.config, args.out, rollouts=args.rollouts, max_new_tokens=args.max_new_tokens,
                                share=args.share, bucket=args.bucket, progress=progress)
        summary = json.loads((args.out / "kl_profile.json").read_text())  # what write_profile derived, read back
        top = next(t for t in summary["top_k_kl_share"] if t["k"] == 100)
        print(f"recommended N = {result.recommended_n} ({summary['rule']} rule, as rollout.horizon=auto: the KL summed "
              f"over the rollouts alive at each position reaches {args.share:.0%} of its total; position-weighted: "
              f"N = {summary['recommended_n_position']}); the 100 highest-KL tokens of a rollout hold "
              f"{top['mean']:.0%} of its KL ({top['tokens']:.0%} of its tokens); results in {args.out}")
        return 0
    if args.probe == "heldout-kl":
        return _heldout_kl(args, progress)
    from esr.analysis.decay import run_decay

    result = run_decay(args.config, args.out, ks=args.ks, task=args.task, limit=args.limit, n=args.n,
                       temperature=args.temperature, max_new_tokens=args.max_new_tokens, mirror=args.mirror,
                       progress=progress)
    for k in result.ks:
        print(f"k={k:4d}  {result.continuer} accuracy {result.accuracy[k]:.3f}  Delta(k) {result.gap[k]:+.3f}")
    for warning in getattr(result, "warnings", ()):
        print(f"warning: {warning}")
    print(f"results in {args.out}")
    return 0


def run_analysis(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.analysis == "cascade":
        from esr.analysis.cascade import run_cascade

        result = run_cascade(args.run, args.out, rollouts=args.rollouts, max_new_tokens=args.max_new_tokens,
                             n=args.n, progress=progress)
        pct = lambda v: "n/a" if v is None else f"{v:.1f}%"
        print(f"KL drop inside [0, {result.n}): {pct(result.drop_in_pct)}; beyond: {pct(result.drop_beyond_pct)}")
        print(f"results in {args.out or args.run / 'analysis'}")
    elif args.analysis == "modes":
        from esr.analysis.modes import run_modes

        out = args.out or args.run / "analysis"
        run_modes([args.run, *args.against], out, rollouts=args.rollouts, max_new_tokens=args.max_new_tokens,
                  top_share=args.top_share, reuse=not args.fresh, progress=progress)
        print(f"results in {out}")
    else:
        from esr.analysis.tokens import run_token_analysis

        target = Path(args.target)
        out = args.out or (target / "analysis" if target.is_dir() else Path("analysis") / target.name)
        run_token_analysis(args.target, out, rollouts=args.rollouts, max_new_tokens=args.max_new_tokens,
                           top=args.top, teacher=args.teacher, progress=progress)
        print(f"results in {out}")
    return 0


def _heldout_kl(args: argparse.Namespace, progress: bool) -> int:
    from rich.console import Console

    from esr.analysis.heldout_kl import run_heldout_kl
    from esr.analysis.heldout_summary import rich_tables
    from esr.analysis.heldout_targets import resolve_targets

    targets = resolve_targets(args.targets, steps=args.steps, base=args.base)
    summary = run_heldout_kl(targets, args.out, prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                             split=args.split, seed=args.seed, progress=progress)
    console = Console()
    for table in rich_tables(summary):
        console.print(table)
    print(f"results in {args.out}")
    return 0
