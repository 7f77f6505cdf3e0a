"""vLLM's sampling speed on this machine by how esr could hand it the student: plain weights (what
``rollout.vllm.lora_sync=merged`` and full fine-tuning give the engine) vs a run-time LoRA adapter
(``lora_sync=adapter``: vLLM's ``LoRARequest``), in float32 and bfloat16.

Each configuration runs in its own process (a fresh in-process engine, as esr builds it: ``esr.rollout.vllm_env``,
eager on the CPU), samples 4 prompts x exactly 100 new tokens at temperature 0.7 (per-row seeds, raw log-probs, as
esr asks), once as a warm-up and then ``--repeats`` times; the adapter is a fresh r=32 LoRA on every linear layer
(lora_B = 0, so both arms sample the same distribution).

    python -m benchmarks.vllm_sampling                      # qwen2.5-coder-0.5b-instruct from the zoo cache

Writes benchmarks/results/vllm_sampling.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True)]


def one(model: str, dtype: str, lora: bool, repeats: int) -> dict:
    """One configuration, in this process."""
    import torch

    from esr.rollout.vllm_env import import_vllm, vllm_kwargs

    vllm = import_vllm(1.0)
    kwargs = vllm_kwargs(dtype=getattr(torch, dtype), max_model_len=612, seed=0, kv_cache_gib=1.0)
    if lora:
        kwargs.update(enable_lora=True, max_lora_rank=32, max_loras=1)
    t0 = time.perf_counter()
    llm = vllm.LLM(model, enforce_eager=True, **kwargs)
    start_s = time.perf_counter() - t0
    request = None
    if lora:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        folder = tempfile.mkdtemp(prefix="vllm-bench-lora-")
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        get_peft_model(base, LoraConfig(r=32, lora_alpha=64, target_modules="all-linear")).save_pretrained(
            folder, save_embedding_layers=False)
        request = vllm.lora.request.LoRARequest("bench", 1, folder)
    prompts = [vllm.inputs.TokensPrompt(prompt_token_ids=list(range(1000 + 150 * i, 1150 + 150 * i)))
               for i in range(4)]
    params = [vllm.SamplingParams(max_tokens=100, min_tokens=100, temperature=0.7, top_k=0, seed=i, logprobs=0,
                                  detokenize=False, ignore_eos=True) for i in range(4)]
    seconds = []
    for _ in range(1 + repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
        seconds.append(time.perf_counter() - t0)
        assert all(len(o.outputs[0].token_ids) == 100 for o in outs)
    timed = seconds[1:]
    return {"dtype": dtype, "lora_adapter": lora, "start_s": start_s, "warmup_s": seconds[0], "seconds": timed,
            "tokens_per_s_median": 400 / sorted(timed)[len(timed) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the zoo's qwen2.5-coder-0.5b-instruct)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", nargs=2, metavar=("DTYPE", "LORA"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_sampling.json"))
    args = ap.parse_args()
    if args.model is None:
        from esr.models import zoo

        args.model = str(zoo.prepare("qwen2.5-coder-0.5b-instruct", progress=False))
    if args.one:
        print(json.dumps(one(args.model, args.one[0], args.one[1] == "1", args.repeats)))
        return
    import platform

    import vllm

    rows = []
    for dtype, lora in CONFIGS:
        done = subprocess.run([sys.executable, "-m", "benchmarks.vllm_sampling", "--model", args.model, "--repeats",
                               str(args.repeats), "--one", dtype, "1" if lora else "0"], cwd=ROOT,
                              capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{dtype:9s} {'LoRA adapter' if lora else 'plain weights':14s} {row['tokens_per_s_median']:6.1f} tokens/s"
              f"  (seconds {', '.join(f'{s:.2f}' for s in row['seconds'])}; start {row['start_s']:.0f} s)", flush=True)
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv), "vllm": vllm.__version__,
            "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
            "model": args.model, "batch": 4, "new_tokens": 100}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
