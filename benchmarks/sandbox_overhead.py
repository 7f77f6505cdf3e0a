"""What the evaluation sandbox costs per program: ``esr.eval.sandbox.run_program`` vs a plain subprocess.

Runs N small HumanEval-like programs (a function plus asserts, all passing) through ``run_program`` and through a
plain ``subprocess.run([sys.executable, "-c", code])``, interleaved one by one (alternating which arm goes first, after
a warm-up of both), and prints a markdown table of the mean and p95 milliseconds per program of each arm and their
ratio. Wall time as the caller sees it: process start, the program, and (for the sandbox) its setup and cleanup.

    python benchmarks/sandbox_overhead.py            # 50 programs
    python benchmarks/sandbox_overhead.py --n 200
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from esr.eval.sandbox import run_program

if __package__:
    from benchmarks.measure import percentile
else:  # run as a script: this folder is sys.path[0]
    from measure import percentile

TEMPLATES = [
    '''def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def check(candidate):
    assert candidate(0) == 0
    assert candidate(1) == 1
    assert candidate({k}) == {fib}


check(fib)
''',
    '''def is_palindrome(text: str) -> bool:
    """Whether text reads the same backwards."""
    return text == text[::-1]


def check(candidate):
    assert candidate("")
    assert candidate("{word}" + "{word}"[::-1])
    assert not candidate("{word}x")


check(is_palindrome)
''',
    '''from typing import List


def sort_even_positions(values: List[int]) -> List[int]:
    """Sort the values at even indices, keep the others in place."""
    evens = sorted(values[::2])
    return [evens[i // 2] if i % 2 == 0 else v for i, v in enumerate(values)]


def check(candidate):
    assert candidate([]) == []
    assert candidate({values}) == {expected}


check(sort_even_positions)
''',
    '''def digit_sum(n: int) -> int:
    """Sum of the decimal digits of n."""
    return sum(int(c) for c in str(abs(n)))


def check(candidate):
    assert candidate(0) == 0
    assert candidate({n}) == {digits}
    assert candidate(-{n}) == {digits}


check(digit_sum)
''',
]


def programs(n: int) -> list[str]:
    """``n`` distinct small programs cycled from the templates (different constants, so no two are identical)."""
    out = []
    for i in range(n):
        k = 10 + i
        a, b = 0, 1
        for _ in range(k):
            a, b = b, a + b
        values = [(7 * i + 3 * j) % 11 for j in range(6 + i % 5)]
        evens = sorted(values[::2])
        expected = [evens[j // 2] if j % 2 == 0 else v for j, v in enumerate(values)]
        number = 1234 + 97 * i
        out.append(TEMPLATES[i % len(TEMPLATES)].format(
            k=k, fib=a, word=f"ab{i}c", values=values, expected=expected, n=number,
            digits=sum(int(c) for c in str(number))))
    return out


def plain(code: str) -> bool:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode == 0


def sandboxed(code: str) -> bool:
    return run_program(code, timeout_s=30).passed


def timed(fn: Callable[[str], bool], code: str) -> tuple[float, bool]:
    start = time.perf_counter()
    ok = fn(code)
    return (time.perf_counter() - start) * 1000, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=50, help="number of programs (default 50)")
    args = parser.parse_args()

    codes = programs(args.n)
    for code in codes[:2]:  # warm-up: page cache, imports of the parent
        plain(code)
        sandboxed(code)
    arms: dict[str, list[tuple[float, bool]]] = {"plain": [], "sandbox": []}
    for i, code in enumerate(codes):
        order = ("plain", "sandbox") if i % 2 == 0 else ("sandbox", "plain")
        for arm in order:
            arms[arm].append(timed(plain if arm == "plain" else sandboxed, code))

    protections = run_program("pass").protections
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, "
          f"euid {os.geteuid()}; {args.n} programs per arm, interleaved")
    print(f"sandbox protections in force: {', '.join(protections)}\n")
    stats = {arm: ([ms for ms, _ in rows], sum(ok for _, ok in rows)) for arm, rows in arms.items()}
    print("| arm | programs | passed | mean ms | p95 ms |")
    print("|---|---|---|---|---|")
    labels = {"plain": '`subprocess.run([sys.executable, "-c", code])`', "sandbox": "`run_program(code)`"}
    for arm, (times, passed) in stats.items():
        mean_ms, p95_ms = statistics.mean(times), percentile(times, 95)
        print(f"| {labels[arm]} | {len(times)} | {passed} | {mean_ms:.1f} | {p95_ms:.1f} |")
    (plain_ms, _), (box_ms, _) = stats["plain"], stats["sandbox"]
    print(f"| ratio sandbox / plain | | | **{statistics.mean(box_ms) / statistics.mean(plain_ms):.2f}x** | "
          f"{percentile(box_ms, 95) / percentile(plain_ms, 95):.2f}x |")
    print(f"\nsandbox overhead per program: {statistics.mean(box_ms) - statistics.mean(plain_ms):+.1f} ms (mean)")
    if any(passed != args.n for _, passed in stats.values()):
        sys.exit("some programs failed: the comparison is not like for like")


if __name__ == "__main__":
    main()
