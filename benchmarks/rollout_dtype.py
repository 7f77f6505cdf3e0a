"""Sampling precision (``rollout.dtype``): HF sampling tokens/s in float32 vs a bfloat16 copy, and the copy's cost.

The trainer keeps float32 master weights; ``rollout.dtype=bfloat16`` samples with a bfloat16 copy of the student
that ``sync_weights`` refreshes every step (esr/rollout/sampling_copy.py). This measures both sides of that trade
on a real model (the zoo's ``qwen2.5-coder-0.5b-instruct`` by default):

- sampling: esr's ``HFSampler`` (per-row seeded sampling, temperature 0.7) on the same batch of GSM-Symbolic prompts,
  every row forced to exactly ``--tokens`` new tokens (``min_new_tokens``), so both arms do the same work; the arms
  alternate (fp32, bf16, fp32, ...) after one short warm-up each; tokens/s = rows x tokens / wall seconds;
- the copy: seconds to build it, and per refresh (one per training step) for LoRA (r=32 alpha 64 on every linear
  layer, the quickstart's: W + scale * B @ A written for each adapted layer) and for full fine-tuning (every
  weight cast).

    python benchmarks/rollout_dtype.py                       # writes benchmarks/results/rollout_dtype.json
    python benchmarks/rollout_dtype.py --model smollm2-135m-instruct --repeats 2 --json /tmp/r.json

A step's sampling time with the copy is its refresh plus its generation: the copy pays when the refresh is small
against the generation time it saves.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import transformers

from esr.data.sources import Prompt
from esr.data.template import tokenize_prompts
from esr.eval.tasks import make_task
from esr.models import apply_lora, load_model
from esr.rollout.eos import eos_token_ids
from esr.rollout.sampler import HFSampler
from esr.rollout.sampling_copy import SamplingCopy

if __package__:
    from benchmarks.measure import peak_rss_gb, write_result
else:  # run as a script: this folder is sys.path[0]
    from measure import peak_rss_gb, write_result


def spread(xs: list[float]) -> dict[str, float | list[float]]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def time_refresh(copy: SamplingCopy, model: torch.nn.Module, repeats: int) -> list[float]:
    """Seconds per ``refresh`` (the work ``sync_weights`` adds to every step)."""
    out = []
    for _ in range(repeats):
        copy.refresh(model)
        out.append(copy.seconds_refresh)
    return out


def time_sampling(arms: dict[str, HFSampler], prompts: list[list[int]], tokens: int,
                  repeats: int) -> dict[str, list[float]]:
    """Tokens per second of each arm, ``repeats`` times in turn (after one short warm-up each)."""
    for sampler in arms.values():
        sampler.sample(prompts, 8, seed=0)  # warm-up
    tps: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(repeats):
        for name, sampler in arms.items():
            t0 = time.perf_counter()
            out = sampler.sample(prompts, tokens, seed=r + 1)
            seconds = time.perf_counter() - t0
            assert int(out.lengths_B.min()) == tokens, "every row must make exactly --tokens tokens"
            tps[name].append(len(prompts) * tokens / seconds)
            print(f"repeat {r + 1} {name}: {tps[name][-1]:.1f} tokens/s", flush=True)
    return tps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="benchmarks/results/rollout_dtype.json")
    args = ap.parse_args(argv)

    model, tok = load_model(args.model)  # float32, the trainer's dtype on a CPU
    items = make_task("gsm_symbolic").load(args.batch)
    prompts = tokenize_prompts([Prompt(it.id, it.messages, None) for it in items], tok, 4096).ids
    eos = eos_token_ids(tok, model)

    for p in model.parameters():  # full fine-tuning: every weight trains, every weight is cast per refresh
        p.requires_grad_(True)
    t0 = time.perf_counter()
    full_copy = SamplingCopy(model, torch.bfloat16)
    build_full = time.perf_counter() - t0
    refresh_full = time_refresh(full_copy, model, args.repeats)
    del full_copy

    peft_model = apply_lora(model, r=32, alpha=64, dropout=0.0, targets="all-linear")
    with torch.no_grad():  # a trained adapter (B != 0), so the merge writes real deltas
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=1e-3)
    t0 = time.perf_counter()
    lora_copy = SamplingCopy(peft_model, torch.bfloat16)
    build_lora = time.perf_counter() - t0
    refresh_lora = time_refresh(lora_copy, peft_model, args.repeats)

    kw = dict(eos_token_ids=eos, pad_token_id=tok.pad_token_id, temperature=0.7, min_new_tokens=args.tokens)
    arms = {"float32": HFSampler(peft_model, **kw),
            "bfloat16 copy": HFSampler(peft_model, sampling_copy=lora_copy, **kw)}
    tps = time_sampling(arms, prompts, args.tokens, args.repeats)

    result = {
        "model": args.model, "batch": args.batch, "new_tokens": args.tokens, "repeats": args.repeats,
        "tokens_per_s": {name: spread(xs) for name, xs in tps.items()},
        "speedup_bf16_over_fp32": statistics.median(tps["bfloat16 copy"]) / statistics.median(tps["float32"]),
        "copy_seconds": {"build_lora": build_lora, "refresh_lora_r32": spread(refresh_lora),
                         "build_full": build_full, "refresh_full": spread(refresh_full)},
        "env": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                "transformers": transformers.__version__, "python": platform.python_version(),
                "load_average": os.getloadavg(), "peak_rss_gb": peak_rss_gb()},
    }
    for name, s in result["tokens_per_s"].items():
        print(f"{name:<14} {s['median']:6.1f} tokens/s (min {s['min']:.1f}, max {s['max']:.1f})")
    print(f"bf16 / fp32: {result['speedup_bf16_over_fp32']:.2f}x; refresh per step: LoRA "
          f"{statistics.median(refresh_lora):.3f} s, full {statistics.median(refresh_full):.3f} s")
    write_result(args.json, result)
    print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
