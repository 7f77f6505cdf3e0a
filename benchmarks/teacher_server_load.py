"""The teacher server under load: C concurrent clients, each sending R scoring requests, against `esr serve-teacher`.

The server runs in its own process (``python -m esr.cli_serve MODEL``) on a free loopback port, with a bearer
token, as in real use; the clients are threads of this process, each with its own ``RemoteTeacher``. Every request
carries S sequences of P prompt tokens + N response tokens (random ids, seeded) and asks for the log-probs of the N
response tokens (and the top-k if ``--top-k``). Latency is per request, as a client sees it: queueing behind the
other clients (the server runs one request at a time on its model) plus scoring plus HTTP and JSON. The run is
bounded: C x R requests at most, and no new request starts after ``--max-seconds``.

    python benchmarks/teacher_server_load.py                                   # tiny-teacher, 8 clients x 20
    python benchmarks/teacher_server_load.py --model qwen2.5-coder-0.5b-instruct --requests 2

Prints a markdown table (and writes JSON with ``--out``). Errors must be 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from esr.serve.client import RemoteTeacher, RemoteTeacherError

if __package__:
    from benchmarks.measure import percentile
else:  # run as a script: this folder is sys.path[0]
    from measure import percentile


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> dict[str, Any]:
    """Poll /health until the server answers (model loading included)."""
    deadline = time.monotonic() + timeout_s
    with RemoteTeacher(url, retries=0, timeout_s=5) as probe:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with status {proc.returncode} before answering")
            try:
                return probe.health()
            except RemoteTeacherError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the server did not answer /health within {timeout_s} s") from None
                time.sleep(0.5)


def make_request(rng: torch.Generator, args: argparse.Namespace, vocab: int) -> list[list[int]]:
    length = args.prompt_tokens + args.response_tokens
    return torch.randint(0, vocab, (args.sequences, length), generator=rng).tolist()


def client_loop(i: int, url: str, token: str, args: argparse.Namespace, vocab: int, deadline: float,
                latencies: list[float], model_seconds: list[float], errors: list[str]) -> None:
    rng = torch.Generator().manual_seed(1000 + i)
    with RemoteTeacher(url, token=token, timeout_s=args.timeout_s, max_batch_sequences=args.sequences) as client:
        for _ in range(args.requests):
            if time.monotonic() > deadline:
                return
            seqs = make_request(rng, args, vocab)
            t0, server_before = time.perf_counter(), client.server_seconds
            try:
                scored = client.score(seqs, args.prompt_tokens, top_k=args.top_k)
            except RemoteTeacherError as err:
                errors.append(str(err))
                continue
            latencies.append(time.perf_counter() - t0)
            model_seconds.append(client.server_seconds - server_before)
            if any(s.logprobs.shape != (args.response_tokens,) for s in scored):
                errors.append("a reply had the wrong number of log-probs")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-teacher")
    ap.add_argument("--concurrency", type=int, default=8, help="C: concurrent clients")
    ap.add_argument("--requests", type=int, default=20, help="R: requests per client")
    ap.add_argument("--sequences", type=int, default=4, help="S: sequences per request")
    ap.add_argument("--prompt-tokens", type=int, default=60, help="P: context tokens per sequence (not scored)")
    ap.add_argument("--response-tokens", type=int, default=100, help="N: scored tokens per sequence")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--max-seconds", type=float, default=900.0, help="no new request after this many seconds")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="client timeout per request")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    load_s, wall, latencies, model_seconds, errors = run_load(args)
    done = len(latencies)
    scored = done * args.sequences * args.response_tokens
    result = {
        "model": args.model, "clients": args.concurrency, "requests_per_client": args.requests,
        "requests_done": done, "sequences_per_request": args.sequences,
        "tokens_per_sequence": args.prompt_tokens + args.response_tokens, "scored_per_sequence": args.response_tokens,
        "top_k": args.top_k, "wall_s": wall, "requests_per_s": done / wall if wall else 0.0,
        "scored_tokens_per_s": scored / wall if wall else 0.0,
        "p50_s": percentile(latencies, 50) if latencies else None,
        "p99_s": percentile(latencies, 99) if latencies else None,
        "mean_model_s": statistics.fmean(model_seconds) if model_seconds else None,
        "errors": len(errors), "server_load_s": load_s,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    print_table(args, result)
    for e in errors[:5]:
        print(f"error: {e}", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


def run_load(args: argparse.Namespace) -> tuple[float, float, list[float], list[float], list[str]]:
    """Start the server, warm it up, run the clients until done or ``--max-seconds``, stop it. Returns (server load
    seconds, wall seconds of the load, per-request latencies, per-request model seconds, errors)."""
    port, token = free_port(), secrets.token_hex(16)
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ESR_TEACHER_TOKEN": token}
    cmd = [sys.executable, "-m", "esr.cli_serve", args.model, "--port", str(port), "--log-level", "warning",
           "--max-batch-tokens", str(args.max_batch_tokens)]
    proc = subprocess.Popen(cmd, env=env)
    try:
        t_load = time.perf_counter()
        health = wait_healthy(url, proc, timeout_s=600)
        load_s = time.perf_counter() - t_load
        vocab = int(health["tokenizer_size"])
        with RemoteTeacher(url, token=token, timeout_s=args.timeout_s) as warm:  # first-call costs out of the way
            warm.score(make_request(torch.Generator().manual_seed(0), args, vocab), args.prompt_tokens, args.top_k)

        latencies: list[float] = []
        model_seconds: list[float] = []
        errors: list[str] = []
        t0 = time.perf_counter()
        deadline = time.monotonic() + args.max_seconds
        threads = [threading.Thread(target=client_loop, args=(i, url, token, args, vocab, deadline, latencies,
                                                              model_seconds, errors))
                   for i in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()  # the server process this script started
        proc.wait(30)
    return load_s, wall, latencies, model_seconds, errors


def print_table(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """The result as the markdown row BENCHMARKS.md quotes, under the command that made it."""
    print()
    print(f"`{' '.join(['python', *sys.argv])}` ({result['machine']}; server ready in {result['server_load_s']:.1f} s)")
    print()
    print("| model | clients x requests | seqs/request (tokens, scored) | top-k | requests done | wall s | requests/s "
          "| scored tokens/s | p50 latency s | p99 latency s | model s/request | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.model} | {args.concurrency} x {args.requests} | {args.sequences} ({result['tokens_per_sequence']}, "
          f"{args.response_tokens}) | {args.top_k} | {result['requests_done']} | {result['wall_s']:.1f} | "
          f"{result['requests_per_s']:.2f} | {result['scored_tokens_per_s']:.0f} | {_fmt(result['p50_s'])} | "
          f"{_fmt(result['p99_s'])} | {_fmt(result['mean_model_s'])} | {result['errors']} |")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}" if x < 10 else f"{x:.1f}"


if __name__ == "__main__":
    main()
