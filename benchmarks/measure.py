"""What every benchmark measures with: wall and CPU time, peak memory, percentiles over repeats, result files.

Standard library only (psutil is imported by ``PeakRSS`` when used), so the TRL arm, which runs in TRL's own virtual
environment without esr, uses it too. Scripts import it as a neighbour, ``python benchmarks/x.py`` and
``python -m benchmarks.x`` alike:

    if __package__:
        from benchmarks.measure import StepClock
    else:  # run as a script: this folder is sys.path[0]
        from measure import StepClock
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# --- process measurements ------------------------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_gb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024 / 1e9


def peak_rss_gb() -> float:
    """Peak resident set of this process (VmHWM; ru_maxrss where /proc is missing), in GB (1e9 bytes)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024 / 1e9


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs). False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss * 1.05 + 1024


def cpu_s() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def set_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)


class StepClock:
    """Per-step wall time, CPU time and phase seconds; resets the peak-RSS counter when the timed steps start."""

    def __init__(self, n_warmup: int) -> None:
        self.n_warmup = n_warmup
        self.steps: list[dict[str, Any]] = []
        self.phases: dict[str, float] = {}
        self.tokens = 0
        self.peak_reset = False
        self.rss_before_timed_gb: float | None = None
        self.peak_before_timed_gb: float | None = None
        self._t0 = self._c0 = 0.0

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def begin(self) -> None:
        if len(self.steps) == self.n_warmup:  # first timed step: peak RSS from here on
            self.rss_before_timed_gb = rss_gb()
            self.peak_before_timed_gb = peak_rss_gb()  # loading + warm-up (the reset also clears ru_maxrss)
            self.peak_reset = reset_peak_rss()
        self.phases, self.tokens = {}, 0
        self._t0, self._c0 = time.perf_counter(), cpu_s()

    def peaks(self) -> dict[str, Any]:
        """peak_rss_gb: the whole process; peak_rss_steps_gb: the timed steps only (None if VmHWM can't be reset)."""
        now = peak_rss_gb()
        if not self.peak_reset:
            return {"peak_rss_gb": now, "peak_rss_steps_gb": None, "peak_before_timed_gb": self.peak_before_timed_gb}
        return {"peak_rss_gb": max(now, self.peak_before_timed_gb or 0.0), "peak_rss_steps_gb": now,
                "peak_before_timed_gb": self.peak_before_timed_gb}

    def end(self, **extra: Any) -> dict[str, Any]:
        total = time.perf_counter() - self._t0
        gen, score = self.phases.get("generate", 0.0), self.phases.get("score", 0.0)
        row = {"step": len(self.steps), "warmup": len(self.steps) < self.n_warmup, "total_s": total,
               "generate_s": gen, "score_s": score, "train_s": total - gen - score,
               "cpu_s": cpu_s() - self._c0, "tokens_generated": self.tokens, **extra}
        self.steps.append(row)
        print(f"[arm] step {row['step']}{' (warm-up)' if row['warmup'] else ''}: {total:.2f} s "
              f"(generate {gen:.2f}, score {score:.2f}, train {row['train_s']:.2f}), {self.tokens} tokens, "
              f"RSS {rss_gb() or 0:.2f} GB", flush=True)
        return row


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms), in GB."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self.proc, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def gb(self) -> float:
        return self.peak / 1e9


# --- repeats and results ------------------------------------------------------------------------------------------

def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (inclusive method) of repeated measurements; the value itself when there is one."""
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1]


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """A benchmark's figures as indented JSON (anything JSON does not know is written as its str)."""
    Path(path).write_text(json.dumps(result, indent=2, default=str))


def arm_main(run_arm: Callable[[dict[str, Any]], dict[str, Any]], usage: str) -> None:
    """An arm process (this file's, or benchmarks/esr_arm.py's): ``ARM.py SPEC.json RESULT.json``. The result gets
    the process's peak RSS and CPU time; a failure is recorded in it (vs_trl.py goes on with the other arms) and
    the exit status is 1."""
    if len(sys.argv) != 3:
        sys.exit(usage)
    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        result = run_arm(spec)
    except BaseException as e:  # the orchestrator records the failure and goes on with the other arms
        result = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        print(result["traceback"], file=sys.stderr, flush=True)
    result.setdefault("peak_rss_gb", peak_rss_gb())
    result["cpu_s_process"] = cpu_s()
    write_result(sys.argv[2], result)
    if result["status"] != "ok":
        sys.exit(1)
