"""One training step of ESR (N=100) vs full rollout (T=400) with esr, and the raw floor for the same work.

Runs in one process, side by side, on the quickstart pair (Qwen2.5-Coder 0.5B student with LoRA r=32, 1.5B
teacher), batch 4, fp32. Prints seconds per phase, peak memory per arm and the ratios:

    python benchmarks/step_time.py                 # quickstart pair (needs the zoo packages)
    python benchmarks/step_time.py --tiny          # tiny models: checks the script itself in seconds

The raw floor is what the same work costs with no esr code at all: plain `generate`, a plain teacher forward
(full logits), a plain student forward + backward (full logits, exact reverse KL), one AdamW step.
Targets on a 2-core CPU: ESR step >= 3x faster than the T=400 step; esr's ESR step within 1.25x of the floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import psutil
import torch

from esr.config import load_config
from esr.rollout.policies import make_policy
from esr.rollout.sampler import HFSampler, left_pad
from esr.train.loop import run_step
from esr.train.session import Session, batch_indices, build_session

if __package__:
    from benchmarks.measure import PeakRSS
else:  # run as a script: this folder is sys.path[0]
    from measure import PeakRSS


def floor_step(s: Session, prompts: list[tuple[int, ...]], new_tokens: int, seed: int,
               micro: int | None = None) -> dict[str, float]:
    """The same work with plain library calls only (no esr code paths except reading prompts), on the student's
    device; on CUDA each phase ends with a synchronise before its clock is read. ``micro``: rows per teacher and
    student pass (gradients accumulate; default the whole batch)."""
    student, teacher = s.student, s.teacher
    device = next(student.parameters()).device
    pad = s.sampler.pad_token_id
    ids_B_P, mask_B_P = (t.to(device) for t in left_pad(prompts, pad))

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    torch.manual_seed(seed)
    t0 = clock()
    student.eval()
    with torch.no_grad():
        out_B_L = student.generate(input_ids=ids_B_P, attention_mask=mask_B_P, do_sample=True, temperature=0.7,
                                   top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
    student.train()
    t_gen = clock() - t0
    attn_B_L = torch.cat([mask_B_P, torch.ones_like(out_B_L[:, ids_B_P.shape[1]:])], dim=1)
    P, B = ids_B_P.shape[1], out_B_L.shape[0]
    t_score = t_train = 0.0
    for a in range(0, B, micro or B):  # micro-batches only where full logits of the whole batch do not fit
        ids, attn = out_B_L[a : a + (micro or B)], attn_B_L[a : a + (micro or B)]
        t0 = clock()
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=attn).logits[:, P - 1 : -1].float()
        t1 = clock()
        s_logits = student(input_ids=ids, attention_mask=attn).logits[:, P - 1 : -1].float()
        logp_s = torch.log_softmax(s_logits, -1)
        kl = (logp_s.exp() * (logp_s - torch.log_softmax(t_logits, -1))).sum(-1).mean() * ids.shape[0] / B
        kl.backward()
        del t_logits, s_logits, logp_s, kl
        t_score, t_train = t_score + t1 - t0, t_train + clock() - t1
    t0 = clock()
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    t_train += clock() - t0
    return {"generate": t_gen, "score": t_score, "train": t_train}


def timed(fn) -> dict[str, float]:
    with PeakRSS() as mem:
        phases = fn()
    return {**phases, "total": sum(phases.values()), "peak_rss_gb": mem.gb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random models (checks the script, not a benchmark)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--T", type=int, default=400)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    base = "configs/smoke.yaml" if args.tiny else "configs/quickstart.yaml"
    common = [f"train.batch_size={args.batch}", f"train.micro_batch_size={args.batch}", "train.steps=1000"]
    cfg_esr = load_config(base, common + ["rollout.horizon=esr", f"rollout.n={args.n}",
                                          f"rollout.min_new_tokens={args.n}",
                                          f"rollout.max_new_tokens={max(args.T, args.n)}"])
    cfg_full = load_config(base, common + ["rollout.horizon=full", f"rollout.max_new_tokens={args.T}",
                                           f"rollout.min_new_tokens={args.T}"])
    t0 = time.perf_counter()
    s = build_session(cfg_esr)
    load_s = time.perf_counter() - t0
    s_full = dataclasses.replace(
        s, policy=make_policy(cfg_full.rollout),
        sampler=HFSampler(s.student, eos_token_ids=s.sampler.eos_token_ids, pad_token_id=s.sampler.pad_token_id,
                          temperature=0.7, min_new_tokens=args.T),
    )

    def prompts(step: int) -> list[tuple[int, ...]]:  # the prompts esr's own step `step` trains on
        return [s.prompt_ids[i] for i in batch_indices(len(s.prompt_ids), args.batch, step, cfg_esr.seed)]

    def esr_step(sess: Session, cfg, step: int):
        def go():
            m = run_step(sess, cfg, step)
            return {"generate": m.seconds_generate, "score": m.seconds_score, "train": m.seconds_train}
        return go

    # Warm-up: one short step so that one-time costs (allocator, thread pools) hit no arm.
    #  run_step plans the horizon with the session's policy, so the warm-up gets a session with its own (8 tokens).
    warm_cfg = load_config(base, common + ["rollout.n=8", "rollout.max_new_tokens=8"])
    run_step(dataclasses.replace(s, policy=make_policy(warm_cfg.rollout)), warm_cfg, 0)
    results = {
        f"esr ESR N={args.n}": timed(esr_step(s, cfg_esr, 1)),
        f"floor N={args.n}": timed(lambda: floor_step(s, prompts(1), args.n, 1)),
        f"esr full T={args.T}": timed(esr_step(s_full, cfg_full, 2)),
        f"floor T={args.T}": timed(lambda: floor_step(s, prompts(2), args.T, 2)),
    }
    print(f"\nmachine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; models loaded in {load_s:.1f} s")
    report(args, results)


def report(args: argparse.Namespace, results: dict[str, dict[str, float]]) -> None:
    """Print each arm's phases and the ratios the targets name; write both as JSON with ``--json``."""
    print(f"{'arm':<22}{'generate':>10}{'score':>10}{'train':>10}{'total':>10}{'peak RSS':>10}")
    for name, r in results.items():
        print(f"{name:<22}{r['generate']:>10.2f}{r['score']:>10.2f}{r['train']:>10.2f}{r['total']:>10.2f}"
              f"{r['peak_rss_gb']:>9.1f}G")
    esr_n, floor_n = results[f"esr ESR N={args.n}"], results[f"floor N={args.n}"]
    esr_t = results[f"esr full T={args.T}"]
    ratios = {
        f"full T={args.T} / ESR N={args.n} (target >= 3)": esr_t["total"] / esr_n["total"],
        "esr ESR / floor (target <= 1.25)": esr_n["total"] / floor_n["total"],
        f"esr full / floor T={args.T}": esr_t["total"] / results[f"floor T={args.T}"]["total"],
    }
    for k, v in ratios.items():
        print(f"{k:<44}{v:>6.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
