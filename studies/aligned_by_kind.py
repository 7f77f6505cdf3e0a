"""Which tokens of an evaluation's answers a cross-tokenizer pair can train (aligned-exact), by kind of token.

aligned-exact trains a student token only where the two tokenizers cut the text the same way (a one-to-one group,
esr.teacher.align). If the cut-differently tokens were mostly the working (digits, operators), training would leave
the working unsupervised and pull the student toward prose. This reads the answers in ``samples.jsonl`` files,
tokenizes each with both tokenizers and prints, for "math" tokens (a digit or one of = + - * / $ % \\ ^ ( ) { })
and for the other ("words") tokens, the share in one-to-one groups and their count:

    python studies/aligned_by_kind.py studies/runs/xfamily/base-eval studies/runs/xfamily/full-512/eval/step-000016
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from esr.models import load_tokenizer
from esr.teacher.align import align_tokens
from esr.teacher.token_bytes import token_bytes_table

MATH = re.compile(rb"[0-9=+\-*/$%\\^(){}]")


def aligned_by_kind(texts: list[str], student_tok, teacher_tok) -> dict[str, tuple[float, int]]:
    """{"math" | "words": (share of the student's tokens in one-to-one groups, token count)}."""
    s_bytes, t_bytes = token_bytes_table(student_tok), token_bytes_table(teacher_tok)
    counts = {"math": [0, 0], "words": [0, 0]}
    for text in texts:
        s_ids = student_tok(text, add_special_tokens=False)["input_ids"]
        t_ids = teacher_tok(text, add_special_tokens=False)["input_ids"]
        for g in align_tokens([s_bytes[i] for i in s_ids], [t_bytes[i] for i in t_ids]):
            for i in range(g.s_start, g.s_stop):
                kind = "math" if MATH.search(s_bytes[s_ids[i]]) else "words"
                counts[kind][0] += g.one_to_one
                counts[kind][1] += 1
    return {k: (aligned / max(total, 1), total) for k, (aligned, total) in counts.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("evals", nargs="+", type=Path, help="folders holding samples.jsonl")
    ap.add_argument("--student", default="smollm2-135m-instruct")
    ap.add_argument("--teacher", default="qwen2.5-coder-0.5b-instruct")
    a = ap.parse_args(argv)
    student_tok, teacher_tok = load_tokenizer(a.student), load_tokenizer(a.teacher)
    print("| answers | math tokens aligned | count | other tokens aligned | count |\n|---|---:|---:|---:|---:|")
    for folder in a.evals:
        texts = [json.loads(line)["response"] for line in (folder / "samples.jsonl").read_text().splitlines() if line]
        r = aligned_by_kind(texts, student_tok, teacher_tok)
        print(f"| {folder} | {r['math'][0]:.3f} | {r['math'][1]} | {r['words'][0]:.3f} | {r['words'][1]} |")


if __name__ == "__main__":
    main()
