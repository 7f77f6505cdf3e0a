"""`esr` command line: each verb parses its arguments and calls the library; no logic lives here."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from esr.cli_check import add_check_parser, run_check
from esr.cli_diagnostics import add_parsers as add_diagnostic_parsers
from esr.cli_diagnostics import run_analysis, run_probe
from esr.cli_serve import add_serve_parser, run_serve
from esr.config.ranges import COUNT, NON_NEGATIVE, SEED, SHARE, argument
from esr.errors import EsrError

EXAMPLES = """examples:
  esr train configs/quickstart.yaml                       # ESR (N=100) distillation, Qwen 0.5B <- 1.5B, on CPU
  esr train configs/quickstart.yaml rollout.horizon=full rollout.max_new_tokens=400
  esr train configs/smoke.yaml train.steps=3 --out runs/smoke
  esr train configs/quickstart-xfamily.yaml               # across tokenizers: SmolLM2-135M <- Qwen 0.5B
  esr train --resume runs/smoke                           # continue a stopped run from its last checkpoint
  esr train --resume runs/smoke train.steps=10            # extend a finished run to 10 steps
  esr check runs/smoke                                    # are its checkpoints intact? what would --resume do?
  esr generate qwen2.5-coder-0.5b-instruct --prompt "What is 17 * 23?"
  esr generate runs/smoke/checkpoints/step-000003 --prompt "Hi" --temperature 0
  esr models                                              # zoo presets: installed? cached?
  esr models prepare qwen2.5-coder-1.5b-instruct          # build the fp32 cache once
  esr eval qwen2.5-coder-0.5b-instruct --task gsm_symbolic --limit 100
  esr probe kl-profile configs/quickstart.yaml            # where does the KL sit? recommends N
  esr report runs/esr-100 runs/full-400                   # one HTML page comparing runs
  esr export runs/smoke --out models/smoke --merge        # a folder transformers and vLLM load without esr
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esr", description="On-policy distillation with early-stopping rollouts.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    verbs = parser.add_subparsers(dest="verb", required=True)

    _add_train_parser(verbs)
    _add_generate_parser(verbs)
    _add_eval_parser(verbs)
    add_diagnostic_parsers(verbs)
    add_serve_parser(verbs)
    add_check_parser(verbs)
    _add_report_parser(verbs)
    _add_models_parser(verbs)
    _add_export_parser(verbs)
    return parser


def _add_train_parser(verbs: argparse._SubParsersAction) -> None:
    t = verbs.add_parser("train", help="distil a student from a teacher", epilog=EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", nargs="?", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 rollout.horizon=full")
    t.add_argument("--out", type=Path, help="run folder (default runs/<name>-<time>)")
    t.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the run in DIR from its last checkpoint; overrides may change only train.steps "
                        "(extend the run), train.checkpoint_every and eval.every")
    t.add_argument("--no-progress", action="store_true", help="no progress bar or per-step lines")


def _add_generate_parser(verbs: argparse._SubParsersAction) -> None:
    g = verbs.add_parser("generate", help="sample from a model, preset or checkpoint")
    g.add_argument("model", help="zoo preset, local folder, checkpoint folder or hub id")
    g.add_argument("--prompt", action="append", required=True, help="a user message (repeat for several)")
    g.add_argument("--max-new-tokens", type=argument(COUNT), default=256)
    g.add_argument("--temperature", type=argument(NON_NEGATIVE, float), default=0.7, help="0 means greedy")
    g.add_argument("--top-p", type=argument(SHARE, float), default=1.0)
    g.add_argument("--seed", type=argument(SEED), default=0)
    g.add_argument("--trust-remote-code", action="store_true", help="run Python shipped with a hub model")
    g.add_argument("--allow-pickle", action="store_true", help="load pickle weights (.bin/.pt): they can run code")


def _add_eval_parser(verbs: argparse._SubParsersAction) -> None:
    e = verbs.add_parser("eval", help="evaluate a model, checkpoint or every checkpoint of a run on a task")
    e.add_argument("model", help="zoo preset, folder, checkpoint, hub id, or a run folder (all its checkpoints)")
    e.add_argument("--task", required=True,
                   help="gsm_symbolic | gsm8k | math500 | jsonl (the last three with --path) | humaneval | bfcl:<cat>")
    e.add_argument("--path", help="JSONL file of a gsm8k, math500 or jsonl task")
    e.add_argument("--n", type=argument(COUNT), default=1, help="samples per problem (avg@n, pass@n, maj@n)")
    e.add_argument("--temperature", type=argument(NON_NEGATIVE, float), default=0.0, help="0 means greedy (then --n 1)")
    e.add_argument("--limit", type=argument(COUNT), help="evaluate the first LIMIT problems")
    e.add_argument("--max-new-tokens", type=argument(COUNT), default=512)
    e.add_argument("--batch-size", type=argument(COUNT), default=8, help="sequences generated together")
    e.add_argument("--seed", type=argument(SEED), default=0)
    e.add_argument("--out", type=Path, help="results folder (default eval/<model>-<task>, or RUN/eval/<task>)")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--trust-remote-code", action="store_true", help="run Python shipped with a hub model")
    e.add_argument("--allow-pickle", action="store_true", help="load pickle weights (.bin/.pt): they can run code")


def _add_report_parser(verbs: argparse._SubParsersAction) -> None:
    r = verbs.add_parser("report", help="compare run folders in one HTML page and a markdown twin",
                         epilog="example:\n  esr report runs/esr-100 runs/full-400 --out reports/esr-vs-full.html",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("runs", nargs="+", type=Path, help="run folders")
    r.add_argument("--out", type=Path, help="HTML file (default FIRST_RUN/report.html; the .md goes beside it)")
    r.add_argument("--title")
    r.add_argument("--analysis", action="append", type=Path, default=[],
                   help="analysis outputs kept outside the run folders (JSON/PNG files or folders); repeatable")


def _add_models_parser(verbs: argparse._SubParsersAction) -> None:
    m = verbs.add_parser("models", help="list zoo presets, or prepare one")
    m.add_argument("action", nargs="?", choices=["list", "prepare"], default="list")
    m.add_argument("name", nargs="?", help="preset to prepare")


def _add_export_parser(verbs: argparse._SubParsersAction) -> None:
    x = verbs.add_parser(
        "export", help="write a checkpoint as a model folder (weights, tokenizer, model card) for transformers/vLLM",
        epilog="examples:\n  esr export runs/smoke --out models/smoke --merge\n"
               "  esr export runs/smoke/checkpoints/step-000003 --out models/smoke-adapter\n"
               "  esr export runs/smoke --out models/smoke --merge --dtype bfloat16 --push-to-hub me/smoke --private",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("checkpoint", type=Path,
                   help="a checkpoint (RUN/checkpoints/step-N) or a run folder: its best checkpoint by eval during "
                        "training (eval/best.json), else its newest")
    x.add_argument("--out", type=Path, required=True, help="new folder to write (refused if it holds anything)")
    x.add_argument("--merge", action="store_true",
                   help="LoRA runs: merge the adapter into the base and write full weights (default: the adapter)")
    x.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="precision of the saved weights (default float32)")
    x.add_argument("--push-to-hub", metavar="REPO",
                   help="then upload the folder to this Hugging Face model repo (token: HF_TOKEN or hf auth login)")
    x.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        verbs = {"train": _train, "generate": _generate, "eval": _eval, "probe": run_probe, "analyze": run_analysis,
                 "report": _report, "models": _models, "serve-teacher": run_serve, "check": run_check,
                 "export": _export}
        return verbs[args.verb](args)
    except (EsrError, FileNotFoundError) as e:  # a message the user can act on, not a traceback
        if args.verbose:
            raise
        print(f"esr: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esr: interrupted", file=sys.stderr)
        return 130


def _train(args: argparse.Namespace) -> int:
    if args.resume is None:
        if args.config is None:
            print("esr: error: give a CONFIG (e.g. configs/quickstart.yaml) or --resume DIR", file=sys.stderr)
            return 2
        from esr.config import load_config

        # Before esr.train is imported (torch and transformers: seconds), so a config error is reported at once.
        cfg = load_config(args.config, args.overrides)
    from esr.train import EXTENDABLE, RunStopped, resume, train
    from esr.train.distributed import is_main
    from esr.train.progress import console, summary_table

    if args.resume is not None:
        # `--resume DIR key=value ...`: argparse takes the first override for CONFIG.
        overrides = [*([args.config] if args.config else []), *args.overrides]
        if args.config and "=" not in args.config:
            print(f"esr: error: --resume DIR takes the run's own config; drop {args.config} (only key=value "
                  f"overrides of {', '.join(EXTENDABLE)} may follow)", file=sys.stderr)
            return 2
        run_dir = args.resume
        call = lambda: resume(run_dir, overrides, progress=not args.no_progress)
    else:
        from esr.train.loop import default_run_dir

        run_dir = args.out or default_run_dir(cfg)
        call = lambda: train(cfg, run_dir, progress=not args.no_progress)
    if is_main():  # several processes (torchrun, accelerate launch): rank 0 speaks for the run
        console.print(f"run folder: {run_dir}")
    try:
        result = call()
    except RunStopped as stopped:  # the first Ctrl-C / SIGTERM: the step finished and was checkpointed
        if is_main():
            print(f"esr: stopped after step {stopped.step} (checkpoint written); continue with: "
                  f"esr train --resume {run_dir}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C (or one before the steps began): stopped at once
        print(f"esr: interrupted; continue with: esr train --resume {run_dir}", file=sys.stderr)  # one line
        return 130
    if is_main():
        console.print(summary_table(result.metrics, result.run_dir))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from esr.generate import generate_text

    texts = generate_text(
        args.model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
    )
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(f"### {prompt}\n{text}\n")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from esr.eval.runner import evaluate
    from esr.eval.targets import eval_targets
    from esr.eval.tasks import make_task
    from esr.models import load_model

    if args.temperature == 0 and args.n > 1:  # before any model loads
        print(f"esr: error: --n {args.n} greedy samples would all be the same: use --temperature > 0 or --n 1",
              file=sys.stderr)
        return 2
    task = make_task(args.task, path=args.path)
    targets = eval_targets(args.model)
    is_run = len(targets) > 1 or targets[0][0] != args.model
    safe_task = args.task.replace(":", "-")
    out = args.out or (Path(args.model) / "eval" / safe_task if is_run
                       else Path("eval") / f"{Path(args.model).name}-{safe_task}")
    rows = []
    for label, spec in targets:
        model, tokenizer = load_model(spec, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
        result = evaluate(model, tokenizer, task, n=args.n, temperature=args.temperature, limit=args.limit,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                          out_dir=out / label if is_run else out, progress=not args.no_progress)
        rows.append((label, result.summary))
        del model
    keys = [k for k in ("accuracy", f"pass@{args.n}", f"maj@{args.n}", "name_accuracy", "parse_rate",
                        "relaxed_accuracy", "multi_box_share", "length_p50", "cut_share") if k in rows[0][1]]
    problems = rows[0][1]["n_problems"]
    table = Table(title=f"esr eval: {task.name}, n={args.n}, T={args.temperature} ({problems} problems)")
    # Metrics down, models across: fits a terminal whether one model or a run's ten checkpoints are compared.
    table.add_column("metric", no_wrap=True)
    for label, _ in rows:
        table.add_column(label, justify="right")
    for k in keys:
        table.add_row(k, *(f"{s[k]:.3f}" if isinstance(s[k], float) else str(s[k]) for _, s in rows))
    Console().print(table)
    print(f"results: {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from esr.report import write_report

    html, md = write_report(args.runs, args.out, title=args.title, analyses=args.analysis)
    print(f"report: {html}\nmarkdown: {md}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from esr.models import zoo

    if args.action == "prepare":
        if not args.name:
            print("esr: error: name a preset: esr models prepare NAME (see `esr models`)", file=sys.stderr)
            return 2
        path = zoo.prepare(args.name, progress=True)
        print(f"{args.name}: cached at {path}")
        return 0
    table = Table(title=f"esr model zoo (cache: {zoo.cache_root()})")
    for col in ("preset", "params", "installed", "cached"):
        table.add_column(col)
    for row in zoo.status():
        table.add_row(row["name"], str(row["params"]), "yes" if row["installed"] else "no",
                      "yes" if row["cached"] else "no")
    Console().print(table)
    return 0


def _export(args: argparse.Namespace) -> int:
    from esr.export import export_checkpoint, push_folder

    if args.private and not args.push_to_hub:
        print("esr: error: --private applies to --push-to-hub REPO; add it or drop --private", file=sys.stderr)
        return 2
    done = export_checkpoint(args.checkpoint, args.out, merge=args.merge, dtype=args.dtype)
    what = "full weights" + (" (LoRA merged)" if done.source.lora else "") if done.merged else "LoRA adapter"
    print(f"exported {done.source.checkpoint} ({done.source.why}): {what}, {done.dtype} -> {done.folder}")
    if args.push_to_hub:
        url = push_folder(done.folder, args.push_to_hub, private=args.private)
        print(f"pushed to {args.push_to_hub}: {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
