"""Evaluation throughput: `esr.eval.evaluate` vs a plain batched `generate` loop on the same prompts.

Both arms decode greedily the same prompts in the same batches with the same cap, so they generate the same tokens;
esr's arm also extracts and judges every answer (math-verify) and writes nothing. Tokens/s counts generated response
tokens (up to and including EOS). Arms alternate (plain, esr, plain, esr) after one warm-up batch.

    python benchmarks/eval_throughput.py                                   # Qwen2.5-Coder-0.5B, 32 GSM-Symbolic
    python benchmarks/eval_throughput.py --model smollm2-135m-instruct --limit 16

Target: esr's tokens/s at least 0.9x the plain loop's (overhead under 10%).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from esr.data.sources import Prompt
from esr.data.template import tokenize_prompts
from esr.eval.runner import evaluate
from esr.eval.tasks import make_task
from esr.models import load_model
from esr.rollout.eos import eos_token_ids


def plain_loop(model, tokenizer, texts: list[str], batch_size: int, max_new_tokens: int, eos: list[int]) -> int:
    """Tokenise with padding, generate greedily per batch, decode; returns generated tokens (to first EOS)."""
    tokenizer.padding_side = "left"
    n_tokens = 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id, top_k=None, top_p=None, temperature=None)
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            stop = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            n_tokens += stop
            tokenizer.decode(row[:stop], skip_special_tokens=True)
    return n_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model, tok = load_model(args.model)
    task = make_task("gsm_symbolic")
    items = task.load(args.limit)
    ids = tokenize_prompts([Prompt(it.id, it.messages, None) for it in items], tok, 4096).ids
    texts = [tok.decode(p) for p in ids]
    eos = eos_token_ids(tok, model)
    plain_loop(model, tok, texts[: args.batch_size], args.batch_size, 16, eos)  # warm-up
    times = {"plain": [], "esr": []}
    tokens = {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        tokens["plain"] = plain_loop(model, tok, texts, args.batch_size, args.max_new_tokens, eos)
        times["plain"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = evaluate(model, tok, task, limit=args.limit, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, progress=False)
        times["esr"].append(time.perf_counter() - t0)
        tokens["esr"] = sum(r["tokens"] for r in result.samples)
    rate = {arm: tokens[arm] / min(times[arm]) for arm in times}
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.model}, {len(texts)} GSM-Symbolic prompts, greedy, batch {args.batch_size}, "
          f"max_new_tokens {args.max_new_tokens}, best of {args.repeats}")
    for arm in ("plain", "esr"):
        print(f"  {arm:6s} {tokens[arm]:6d} tokens  {min(times[arm]):7.2f} s  {rate[arm]:7.1f} tokens/s")
    print(f"  esr / plain throughput: {rate['esr'] / rate['plain']:.3f}x (target >= 0.9x); "
          f"accuracy {result.summary['accuracy']:.3f}; judging (math-verify) {result.summary['seconds_judge']:.2f} s "
          f"of esr's last run")
    print(json.dumps({"tokens": tokens, "seconds": times, "ratio": rate["esr"] / rate["plain"]}))


if __name__ == "__main__":
    main()
