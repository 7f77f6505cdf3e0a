"""Teacher scoring of one batch: one-row passes vs one pass over all rows vs a plain HF forward (what TRL runs).

esr's teacher runs ``train.teacher_batch_size`` rows per no-grad forward (default: the whole batch), keeps the
hidden states of response positions and projects them to logits a chunk of ``loss.chunk_size`` positions at a time
in the loss. This script times, in one process on the same rollouts (the quickstart pair; the student samples the
batch once):

- ``one-row passes + heads``: what esr did with ``train.micro_batch_size=1`` before teacher passes were batched;
- ``all-row pass + heads``: what it does now (``TeacherScorer.score_micro_batches``);
- the decoder bodies alone, both ways; and a plain ``teacher(input_ids).logits`` with full logits.

    python benchmarks/teacher_pass.py                       # quickstart pair, batch 4, 100 new tokens, 2 threads
    python benchmarks/teacher_pass.py --set student.name=tiny-student teacher.name=tiny-teacher  # a quick check
"""

from __future__ import annotations

import argparse
import time

import torch

from esr.config import load_config
from esr.models.forward import head_logits, response_hidden
from esr.train.session import batch_indices, build_session


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=100, help="new tokens per rollout (exactly)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="more config overrides")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"train.batch_size={args.batch}", "train.micro_batch_size=1",
                                    "rollout.horizon=full", f"rollout.min_new_tokens={args.tokens}",
                                    f"rollout.max_new_tokens={args.tokens}", *args.set])
    s = build_session(cfg)
    prompts = [s.prompt_ids[i] for i in batch_indices(len(s.prompt_ids), args.batch, 0, cfg.seed)]
    rollouts = s.sampler.sample(prompts, args.tokens, seed=1, row_ids=range(args.batch),
                                pad_to=max(map(len, prompts)))
    teacher, chunk, B = s.scorer.model, cfg.loss.chunk_size, args.batch
    print(f"rollouts: {tuple(rollouts.input_ids_B_L.shape)} (prompt columns {rollouts.prompt_len})", flush=True)

    def heads(hidden_B_R_H: torch.Tensor) -> None:
        for c in range(0, hidden_B_R_H.shape[1], chunk):
            head_logits(teacher, hidden_B_R_H[:, c : c + chunk], s.vocab_size)

    arms = {
        "one-row passes + heads (before)": lambda: [heads(response_hidden(teacher, rollouts.slice(a, a + 1)))
                                                    for a in range(B)],
        "all-row pass + heads (now)": lambda: [heads(h) for h in s.scorer.score_micro_batches(rollouts, 1)],
        "decoder body, one-row passes": lambda: [response_hidden(teacher, rollouts.slice(a, a + 1))
                                                 for a in range(B)],
        "decoder body, all-row pass": lambda: response_hidden(teacher, rollouts),
        "plain HF forward, full logits": lambda: teacher(input_ids=rollouts.input_ids_B_L,
                                                         attention_mask=rollouts.attention_mask_B_L).logits,
    }
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, fn in arms.items():
                t0 = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - t0)
    print(f"\n{'teacher scoring, batch ' + str(B):<36}" + "".join(f"{'run ' + str(i + 1):>9}"
                                                               for i in range(args.repeats)))
    for name, ts in seconds.items():
        print(f"{name:<36}" + "".join(f"{t:>8.2f}s" for t in ts))
    return seconds


if __name__ == "__main__":
    main()
