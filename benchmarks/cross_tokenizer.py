"""Cross-tokenizer overhead and coverage on real cross-family pairs, from real rollouts.

For each pair: build the session (timing the one-off byte tables + shared-vocabulary map), run a few real ESR
training steps, and report per step the re-render + re-encode + alignment seconds as a share of the whole step, and
the share of generated student tokens that got loss under `aligned-exact` (and that are alignable at all, which is
what `span-sampled` trains).

    python benchmarks/cross_tokenizer.py                  # SmolLM2 <- Qwen and Gemma <- Qwen, 3 steps each
    python benchmarks/cross_tokenizer.py --steps 1 --pairs smollm2

Target: alignment plus re-encoding under 10% of one ESR step.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from esr.config import load_config
from esr.teacher.cross import CrossTokenizer
from esr.train.loop import run_step
from esr.train.session import batch_indices, build_session

PAIRS = {
    "smollm2": "configs/quickstart-xfamily.yaml",
    "gemma": "configs/xfamily-gemma.yaml",
}


def measure(config: str, steps: int) -> dict[str, float]:
    cfg = load_config(config, [f"train.steps={steps}"])
    s = build_session(cfg)
    assert s.cross is not None, f"{config}: expected a cross-tokenizer pair"
    t0 = time.perf_counter()  # the one-off setup, timed again on its own (the session built it once already)
    CrossTokenizer(s.cross.student_tok, s.cross.teacher_tok, student_size=len(s.cross.student_bytes),
                   teacher_size=len(s.cross.teacher_bytes), student_eos_ids=sorted(s.cross.student_eos),
                   teacher_prompt_ids=s.cross.teacher_prompt_ids)
    setup = time.perf_counter() - t0
    rows = [run_step(s, cfg, step) for step in range(steps)]
    exact = sum(m.tokens_scored for m in rows) / sum(m.tokens_generated for m in rows)
    # One more batch of real rollouts from the trained student, to count what span-sampled would train as well.
    idx = batch_indices(len(s.prompt_ids), cfg.train.batch_size, steps, cfg.seed)
    rollouts = s.sampler.sample([s.prompt_ids[i] for i in idx], s.policy.plan(steps), seed=steps)
    batch = s.cross.translate(rollouts, idx)
    alignable = float((batch.trainable_B_R & rollouts.response_mask_B_R).sum()) / float(rollouts.lengths_B.sum())
    exact_fresh = float((batch.exact_B_R & rollouts.response_mask_B_R).sum()) / float(rollouts.lengths_B.sum())
    step_s = [m.seconds_generate + m.seconds_score + m.seconds_train + m.seconds_align for m in rows]
    align_s = [m.seconds_align for m in rows]
    return {
        "steps": steps, "batch": cfg.train.batch_size, "shared_vocab": len(s.cross.vocab_map),
        "setup_s": setup, "step_s": sum(step_s) / steps, "align_s": sum(align_s) / steps,
        "align_share": sum(align_s) / sum(step_s), "aligned_exact_share": exact,
        "aligned_exact_share_fresh": exact_fresh, "span_alignable_share": alignable,
        "kl_first": rows[0].kl, "kl_last": rows[-1].kl,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    results = {}
    for name in args.pairs:
        results[name] = r = measure(PAIRS[name], args.steps)
        print(f"\n{name} <- qwen ({PAIRS[name]}, batch {r['batch']}, {r['steps']} ESR steps)")
        print(f"  one-off setup (byte tables + shared vocabulary of {r['shared_vocab']:,} tokens): "
              f"{r['setup_s']:.2f} s")
        print(f"  step {r['step_s']:.2f} s, of which re-render + re-encode + align {r['align_s'] * 1000:.1f} ms "
              f"= {100 * r['align_share']:.3f}% (target < 10%)")
        print(f"  response tokens trained by aligned-exact: {100 * r['aligned_exact_share']:.1f}% "
              f"(fresh batch {100 * r['aligned_exact_share_fresh']:.1f}%); alignable (span-sampled): "
              f"{100 * r['span_alignable_share']:.1f}%")
    print("\n" + json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
