"""`esr serve-teacher MODEL`: serve a frozen teacher over HTTP (see ``esr.serve.server`` for the protocol).

The bearer token is read from an environment variable (``--token-env``, default ``ESR_TEACHER_TOKEN``), never from
the command line, where other users could read it in the process list. Also runnable on its own:
``python -m esr.cli_serve MODEL [options]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from esr.config.ranges import COUNT, POSITIVE, argument, at_least, between
from esr.errors import EsrError
from esr.serve import DEFAULT_TOKEN_ENV

EXAMPLES = """examples:
  esr serve-teacher qwen2.5-coder-1.5b-instruct                     # http://127.0.0.1:8000, no token
  ESR_TEACHER_TOKEN=s3cret esr serve-teacher tiny-teacher --port 8100
  MY_TOKEN=s3cret esr serve-teacher runs/x/checkpoints/step-000100 --host 0.0.0.0 --token-env MY_TOKEN
  curl -s localhost:8000/v1/score -d '{"sequences": [[1, 2, 3, 4]], "start": 2, "top_k": 5}'
"""


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `serve-teacher` verb to an argparse subparsers object."""
    p = subparsers.add_parser(
        "serve-teacher", help="serve a teacher over HTTP: per-token log-probs and top-k of token sequences",
        description="Serve a frozen teacher over HTTP: POST /v1/score (esr), POST /v1/completions (vLLM's "
                    "prompt_logprobs subset), GET /health.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="zoo preset, local folder, checkpoint folder or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=argument(between(1, 65535)), default=8000)
    p.add_argument("--token-env", metavar="VAR",
                   help=f"environment variable holding the bearer token (default {DEFAULT_TOKEN_ENV}, if set)")
    p.add_argument("--max-request-mb", type=argument(POSITIVE, float), default=16.0,
                   help="largest request body, MiB (413 above)")
    p.add_argument("--max-batch-tokens", type=argument(COUNT), default=8192,
                   help="padded tokens per forward pass; also the longest sequence accepted")
    p.add_argument("--max-top-k", type=argument(at_least(0)), default=20,
                   help="largest top_k / prompt_logprobs a request may ask")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def run_serve(args: argparse.Namespace) -> int:
    """Load the model and serve it until interrupted; returns the exit status."""
    if args.token_env is not None and args.token_env not in os.environ:
        print(f"esr: error: --token-env {args.token_env}: that environment variable is not set", file=sys.stderr)
        return 2
    token = os.environ.get(args.token_env or DEFAULT_TOKEN_ENV) or None
    if args.max_request_mb <= 0 or args.max_batch_tokens < 1 or args.max_top_k < 0:
        print("esr: error: --max-request-mb and --max-batch-tokens must be positive, --max-top-k >= 0",
              file=sys.stderr)
        return 2
    try:
        from esr.serve.server import serve
    except ModuleNotFoundError as err:
        print(f"esr: error: serving needs the serve extra ({err.name} is missing): pip install 'esr-distill[serve]'",
              file=sys.stderr)
        return 2
    serve(args.model, host=args.host, port=args.port, token=token, dtype=args.dtype, device=args.device,
          max_request_bytes=int(args.max_request_mb * 2**20), max_batch_tokens=args.max_batch_tokens,
          max_top_k=args.max_top_k, trust_remote_code=args.trust_remote_code, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m esr.cli_serve MODEL ...`: the same verb without the rest of the esr command line."""
    import logging

    parser = argparse.ArgumentParser(prog="esr")
    add_serve_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["serve-teacher", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_serve(args)
    except (EsrError, FileNotFoundError) as e:
        print(f"esr: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
