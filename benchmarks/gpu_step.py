"""ESR on a GPU at the paper's scale: one training step of esr vs full rollout vs the raw floor, random weights.

The paper's efficiency table (PAPERS.md: one A6000 48 GB, bf16, batch 16, Qwen2.5-Math-1.5B student with LoRA r=32,
Qwen3-1.7B teacher) gives 8 s per ESR step (N=100) and 194 s per full-rollout step (~1000 tokens). This script runs
the same shapes through esr's own training step (``esr.train.loop.run_step``) on whatever GPU it finds:

- student: Qwen2.5-Math-1.5B's architecture (qwen2, 28 layers, hidden 1536, 12/2 heads), LoRA r=32 alpha 64 on all
  linear layers; teacher: Qwen3-1.7B's (qwen3, 28 layers, hidden 2048, 16/8 heads); both with random weights, written
  once as ordinary model folders (config + safetensors + the Qwen tokenizer) and loaded through esr's folder path.
  Weights cannot reach a GPU machine without a hub, and speed does not depend on their values: every rollout is
  forced to exactly N (or T) tokens by ``min_new_tokens``, so the work is the same as with trained weights.
- prompts: GSM8K train questions (a JSONL file), rendered with the Qwen chat template.
- arms, in one process: esr ESR N=100 (several steps), the raw floor for the same work (plain ``generate`` with HF
  sampling + a plain teacher forward + a plain student forward/backward on full logits + AdamW), esr full rollout at
  T=1024 and its floor, then esr ESR at larger batches (per-sample cost).
- ``--engine hf hf-compiled``: the ESR N=100 arm again with each further rollout engine, side by side on the same
  session (``esr[hf-compiled] ESR N=..., batch ...``), after one untimed step that compiles it (its seconds are
  ``env.engine_warmup_s``). ``--rollout-dtype`` sets ``rollout.dtype`` for every engine (on CUDA the trainer is
  bf16, so ``auto`` samples in bf16 with the trainer's own module).

    python benchmarks/gpu_step.py --export-tokenizer .carry/qwen-tokenizer   # here: the tokenizer, from the zoo
    python benchmarks/gpu_step.py --tokenizer .carry/qwen-tokenizer --data .carry/gsm8k-train.jsonl --json out.json
    python benchmarks/gpu_step.py --tokenizer ... --data ... --engine hf hf-compiled --skip-full --sweep
    python benchmarks/gpu_step.py --tiny --device cpu ...                       # 2-layer models: checks the script

Phase times are esr's own (``StepMetrics``); on CUDA the scorer synchronises before reading its clock, so the
teacher's time is not billed to training. Peak memory is ``torch.cuda.max_memory_allocated`` over each arm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from esr.config import load_config
from esr.rollout.engine import make_sampler
from esr.rollout.policies import make_policy
from esr.rollout.sampler import HFSampler
from esr.train.loop import run_step
from esr.train.session import Session, batch_indices, build_session

if __package__:
    from benchmarks.step_time import floor_step
else:  # run as a script: this folder is sys.path[0]
    from step_time import floor_step

QWEN_VOCAB = 151936
STUDENT = dict(  # Qwen2.5-Math-1.5B (its config.json)
    model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, vocab_size=QWEN_VOCAB,
)
TEACHER = dict(  # Qwen3-1.7B (its config.json)
    model_type="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, vocab_size=QWEN_VOCAB,
)
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64)


def export_tokenizer(folder: str) -> None:
    """Save the Qwen2.5 tokenizer (chat template included) of the zoo's quickstart student to ``folder``."""
    from esr.models.load import load_tokenizer

    load_tokenizer("qwen2.5-coder-0.5b-instruct").save_pretrained(folder)
    print(f"tokenizer written to {folder}")


def write_random_model(arch: dict, tokenizer_dir: str, folder: Path, device: torch.device, dtype: torch.dtype,
                       seed: int) -> None:
    """An ordinary HF model folder with ``arch``'s shapes and seeded random weights (initialised on ``device``)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(**arch, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def arm(device: torch.device, fn) -> dict[str, float]:
    """Run ``fn`` (returns its phase seconds), adding the total wall time and the arm's peak device memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    phases = fn()
    sync(device)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    return {**phases, "total": sum(phases.values()), "wall": wall, "peak_gb": peak}


def sampler_costs(device: torch.device, batch: int, vocab: int = QWEN_VOCAB, iters: int = 50) -> dict[str, float]:
    """Milliseconds per token step of esr's RowSampling and of its parts, against HF's own sampling (softmax +
    multinomial), on (batch, vocab) logits: where esr's generation loses to the floor's on a GPU, if it is here."""
    from esr.rollout.sampler import RowSampling

    logits = torch.randn(batch, vocab, device=device)
    ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
    row = RowSampling(0.7, 1.0, seed=0, row_ids=range(batch))
    parts = {
        "esr RowSampling (whole)": lambda: row(ids, logits),
        "  softmax fp32 -> fp64": lambda: torch.softmax(logits / 0.7, -1).double(),
        "  cumsum fp64": lambda: logits.double().cumsum(-1),
        "  searchsorted fp64": lambda: torch.searchsorted(logits.double(), torch.zeros(batch, 1, device=device,
                                                                                       dtype=torch.float64)),
        "HF sampling (softmax + multinomial)": lambda: torch.multinomial(torch.softmax(logits / 0.7, -1), 1),
    }
    out = {}
    for name, fn in parts.items():
        for _ in range(5):
            fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        out[name] = (time.perf_counter() - t0) / iters * 1e3
    return out


def mean_of(runs: list[dict[str, float]]) -> dict[str, float]:
    out = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
    out["peak_gb"] = max(r["peak_gb"] for r in runs)
    out["runs"] = len(runs)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export-tokenizer", metavar="DIR", help="write the Qwen tokenizer to DIR and exit")
    ap.add_argument("--tokenizer", help="folder with the Qwen tokenizer (from --export-tokenizer)")
    ap.add_argument("--data", help="GSM8K-format JSONL of prompts")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="2-layer models: checks the script, not a benchmark")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--micro", type=int, default=16, help="esr's train.micro_batch_size (at most the batch)")
    ap.add_argument("--esr-steps", type=int, default=3)
    ap.add_argument("--sweep", type=int, nargs="*", default=[32, 64], help="more ESR batch sizes (per-sample cost)")
    ap.add_argument("--skip-full", action="store_true", help="leave out the two T arms")
    ap.add_argument("--floor-micro", type=int, default=4,
                    help="rows per pass of the T floor (its full B x T x V float logits do not fit at once)")
    ap.add_argument("--engine", nargs="+", choices=("hf", "hf-compiled"), default=["hf"],
                    help="rollout engines timed on the ESR arm, side by side (hf, the baseline, always runs)")
    ap.add_argument("--rollout-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="rollout.dtype of every engine")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)
    if not args.export_tokenizer and not (args.tokenizer and args.data):
        ap.error("--tokenizer and --data are needed (see --export-tokenizer)")
    return args


class Bench:
    """The random-weight session and the arms run on it: esr's steps at a given batch and horizon, and the floor's."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        work = Path(tempfile.mkdtemp(prefix="esr-gpu-step-"))
        t0 = time.perf_counter()
        for name, arch, seed in (("student", STUDENT, 1), ("teacher", TEACHER, 2)):
            write_random_model({**arch, **(TINY if args.tiny else {})}, args.tokenizer, work / name, self.device,
                               self.dtype, seed)
        self.seconds_write = time.perf_counter() - t0
        print(f"random models written to {work} in {self.seconds_write:.1f} s", flush=True)
        self.common = [f"student.name={work / 'student'}", f"teacher.name={work / 'teacher'}", "data.source=gsm8k",
                       f"data.path={args.data}", "data.limit=2000", f"train.device={args.device}",
                       "train.steps=1000", "train.lr=5.0e-5", "lora.r=32", "lora.alpha=64",
                       "rollout.temperature=0.7", "loss.kind=reverse_kl", f"rollout.dtype={args.rollout_dtype}"]
        self.engine_warmup_s: dict[str, float] = {}
        self.cfg_esr = self.cfg_for(args.batch, "esr", args.n)
        t0 = time.perf_counter()
        self.session = s = build_session(self.cfg_esr)
        self.seconds_load = time.perf_counter() - t0
        print(f"session built in {self.seconds_load:.1f} s: {s.info['student_params'] / 1e9:.2f} B student params "
              f"({s.info['trainable_params'] / 1e6:.1f} M trainable), {s.info['teacher_params'] / 1e9:.2f} B "
              f"teacher, {s.info['dtype']} on {s.info['device']}", flush=True)

    def cfg_for(self, batch: int, horizon: str, tokens: int):
        """esr's config for one arm: ESR with N=``tokens``, or full rollout of exactly ``tokens`` tokens."""
        shape = [f"train.batch_size={batch}", f"train.micro_batch_size={min(batch, self.args.micro)}"]
        if horizon == "esr":
            return load_config("configs/quickstart.yaml", self.common + shape + [
                "rollout.horizon=esr", f"rollout.n={tokens}", f"rollout.min_new_tokens={tokens}",
                f"rollout.max_new_tokens={max(tokens, self.args.T)}"])
        return load_config("configs/quickstart.yaml", self.common + shape + [
            "rollout.horizon=full", f"rollout.max_new_tokens={tokens}", f"rollout.min_new_tokens={tokens}"])

    def with_tokens(self, cfg, tokens: int) -> Session:
        """The session with ``cfg``'s horizon policy and a sampler forced to at least ``tokens`` new tokens."""
        s = self.session
        sampler = HFSampler(s.student, eos_token_ids=s.sampler.eos_token_ids, pad_token_id=s.sampler.pad_token_id,
                            temperature=0.7, min_new_tokens=tokens)
        return dataclasses.replace(s, policy=make_policy(cfg.rollout), sampler=sampler)

    def with_engine(self, engine: str) -> Session:
        """The session sampling with rollout engine ``engine`` (``cfg_esr``'s rollout settings otherwise)."""
        s, rollout = self.session, dataclasses.replace(self.cfg_esr.rollout, engine=engine)
        sampler = make_sampler(rollout, s.student, eos_token_ids=s.sampler.eos_token_ids,
                               pad_token_id=s.sampler.pad_token_id)
        return dataclasses.replace(s, sampler=sampler)

    def engine_arms(self, record, step: int) -> int:
        """The ESR arm with each ``--engine`` besides hf, after one untimed step (compiles, captures graphs)."""
        a = self.args
        for engine in (e for e in a.engine if e != "hf"):
            sess = self.with_engine(engine)
            t0 = time.perf_counter()
            run_step(sess, self.cfg_esr, step)
            self.engine_warmup_s[engine] = time.perf_counter() - t0
            step += 1
            runs = []
            for _ in range(a.esr_steps):
                runs.append(arm(self.device, self.esr_step(sess, self.cfg_esr, step)))
                step += 1
            record(f"esr[{engine}] ESR N={a.n}, batch {a.batch}", mean_of(runs))
        return step

    def esr_step(self, sess: Session, cfg, step: int):
        def go():
            self.session.scorer.seconds = 0.0
            m = run_step(sess, cfg, step)
            return {"generate": m.seconds_generate, "score": m.seconds_score, "train": m.seconds_train}
        return go

    def prompts(self, batch: int, step: int) -> list[tuple[int, ...]]:
        ids = self.session.prompt_ids
        return [ids[i] for i in batch_indices(len(ids), batch, step, self.cfg_esr.seed)]

    def warm_up(self) -> None:
        """One short step (8 tokens) so CUDA context, cuBLAS handles and kernels' first launches hit no arm."""
        warm = self.cfg_for(self.args.batch, "esr", 8)
        run_step(self.with_tokens(warm, 8), warm, 0)
        floor_step(self.session, self.prompts(self.args.batch, 0), 8, 0)

    def run_arms(self, record) -> None:
        """ESR steps at the batch, the floor for the same work, the batch sweep, then full rollout and its floor."""
        a, dev = self.args, self.device
        step = 1
        runs = []
        for _ in range(a.esr_steps):
            runs.append(arm(dev, self.esr_step(self.session, self.cfg_esr, step)))
            step += 1
        record(f"esr ESR N={a.n}, batch {a.batch}", mean_of(runs))
        record(f"floor N={a.n}, batch {a.batch}",
               arm(dev, lambda: floor_step(self.session, self.prompts(a.batch, 1), a.n, 1)))
        step = self.engine_arms(record, step)
        for b in a.sweep:
            record(f"esr ESR N={a.n}, batch {b}", arm(dev, self.esr_step(self.session, self.cfg_for(b, "esr", a.n),
                                                                          step)))
            step += 1
        if not a.skip_full:  # last: the longest arms
            cfg_full = self.cfg_for(a.batch, "full", a.T)
            record(f"esr full T={a.T}, batch {a.batch}",
                   arm(dev, self.esr_step(self.with_tokens(cfg_full, a.T), cfg_full, step)))
            record(f"floor T={a.T}, batch {a.batch}",
                   arm(dev, lambda: floor_step(self.session, self.prompts(a.batch, 2), a.T, 2, micro=a.floor_micro)))


def environment(bench: Bench, sampler_ms: dict[str, float]) -> dict:
    device = bench.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    smi = ""
    if device.type == "cuda":
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    return {"device": gpu, "nvidia_smi": smi, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "python": platform.python_version(), "dtype": str(bench.dtype),
            "seconds_write_models": bench.seconds_write, "seconds_build_session": bench.seconds_load,
            "tiny": bench.args.tiny, "sampler_ms_per_token": sampler_ms, "rollout_dtype": bench.args.rollout_dtype,
            "engine_warmup_s": bench.engine_warmup_s}


def report(args: argparse.Namespace, env: dict, results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Print the table and the ratios (esr over the floor; full rollout over ESR); returns the ratios."""
    print(f"\n{env['device']}; torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, "
          f"{env['dtype']}")
    print(f"{'arm':<30}{'generate':>10}{'score':>8}{'train':>8}{'total':>8}{'wall':>8}{'s/sample':>10}{'peak':>9}")
    for name, r in results.items():
        b = int(name.rsplit("batch ", 1)[1])
        print(f"{name:<30}{r['generate']:>10.2f}{r['score']:>8.2f}{r['train']:>8.2f}{r['total']:>8.2f}"
              f"{r['wall']:>8.2f}{r['wall'] / b:>10.3f}{r['peak_gb']:>8.1f}G")
    esr_n = results[f"esr ESR N={args.n}, batch {args.batch}"]
    ratios = {"esr ESR / floor": esr_n["wall"] / results[f"floor N={args.n}, batch {args.batch}"]["wall"]}
    for engine in (e for e in args.engine if e != "hf"):
        ratios[f"esr[{engine}] / esr[hf] ESR N={args.n}"] = (
            results[f"esr[{engine}] ESR N={args.n}, batch {args.batch}"]["wall"] / esr_n["wall"])
    if not args.skip_full:
        esr_t, floor_t = (results[f"{a} T={args.T}, batch {args.batch}"] for a in ("esr full", "floor"))
        ratios[f"full T={args.T} / ESR N={args.n} (paper: 24x)"] = esr_t["wall"] / esr_n["wall"]
        ratios[f"esr full / floor T={args.T}"] = esr_t["wall"] / floor_t["wall"]
    for k, v in ratios.items():
        print(f"{k:<44}{v:>7.2f}x")
    return ratios


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.export_tokenizer:
        export_tokenizer(args.export_tokenizer)
        return
    bench = Bench(args)
    bench.warm_up()
    sampler_ms = sampler_costs(bench.device, args.batch)
    print("sampler, ms per token step: " + ", ".join(f"{k.strip()} {v:.3f}" for k, v in sampler_ms.items()),
          flush=True)

    results: dict[str, dict[str, float]] = {}

    def record(name: str, r: dict[str, float]) -> None:  # each arm is saved as it ends: a cut-off run keeps them
        results[name] = r
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"results": results}, indent=2))

    bench.run_arms(record)
    env = environment(bench, sampler_ms)
    ratios = report(args, env, results)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": results, "ratios": ratios}, indent=2))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
