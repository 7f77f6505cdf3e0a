"""`esr serve-teacher`: a frozen teacher behind HTTP (starlette on uvicorn), scoring token sequences.

Endpoints (request and response shapes in ``esr.serve.protocol``):

    GET  /health           {"status": "ok", "model", "vocab_size", "tokenizer_size", "dtype", "device", limits,
                            "params", "tokenizer_sha256"}; ?vocab_prefix=N adds "vocab_prefix_sha256" (esr.serve.vocab)
    GET  /v1/models        OpenAI's model list, with the one served model
    POST /v1/score         esr's protocol: per-token log-probs of the given tokens from a start position, top-k
    POST /v1/completions   the prompt-scoring subset of vLLM's OpenAI-compatible endpoint (prompt_logprobs)

How a request runs: the body is read on the event loop (refused with 413 as soon as it passes
``max_request_bytes``), then parsed, validated, scored and formatted in a worker thread (starlette's
``run_in_threadpool``) so the loop keeps answering. One lock guards the model, so concurrent requests queue instead of
interleaving on it; inside, the sequences run under ``torch.no_grad`` in micro-batches of at most
``max_batch_tokens`` padded tokens, and only the scored positions are projected to the vocabulary
(``esr.serve.scoring``).

Security: the server binds 127.0.0.1 unless told otherwise, and warns when it binds elsewhere without a token. With
a token, every endpoint but /health needs ``Authorization: Bearer <token>`` (compared in constant time) and answers
401 otherwise. Token ids are checked against the vocabulary, lengths against the limits, before the model runs.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from torch import nn

from esr.serve.protocol import (
    CompletionJob,
    Limits,
    RequestError,
    ScoreJob,
    completion_response,
    error_body,
    parse_completion_request,
    parse_score_request,
    score_response,
)
from esr.serve.scoring import SequenceScores, model_vocab_size, score_sequences
from esr.serve.vocab import vocab_digest

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
DEFAULT_MAX_BATCH_TOKENS = 8192
DEFAULT_MAX_TOP_K = 20  # vLLM's default max_logprobs


class TeacherService:
    """The model, its tokenizer and the lock that keeps one request at a time on the model."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, *, model_name: str, max_batch_tokens: int, max_top_k: int
    ) -> None:
        if max_batch_tokens < 1 or max_top_k < 0:
            raise ValueError("max_batch_tokens must be >= 1 and max_top_k >= 0")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_batch_tokens = max_batch_tokens
        self.vocab_size = model_vocab_size(model)
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or max_batch_tokens
        self.limits = Limits(self.vocab_size, min(max_batch_tokens, int(context)), max_top_k)
        self.lock = threading.Lock()
        self._decoded: dict[int, str] = {}
        self._digests: dict[int, str] = {}
        self.params = sum(p.numel() for p in self.model.parameters())

    def run(self, job: ScoreJob, *, with_ranks: bool = False, predict_next: bool = False
            ) -> tuple[list[SequenceScores], float]:
        """Score a validated job; returns the scores and the seconds the model ran (queueing excluded)."""
        with self.lock:
            t0 = time.perf_counter()
            scores = score_sequences(
                self.model, job.sequences, job.starts, top_k=job.top_k, vocab_size=job.vocab_size or self.vocab_size,
                max_batch_tokens=self.max_batch_tokens, with_ranks=with_ranks, predict_next=predict_next,
            )
            return scores, time.perf_counter() - t0

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; single tokens (vLLM's decoded_token) are cached."""
        if len(ids) != 1:
            return self.tokenizer.decode(list(ids))
        token = ids[0]
        text = self._decoded.get(token)
        if text is None:
            text = self._decoded[token] = self.tokenizer.decode([token])
        return text

    def describe(self, vocab_prefix: int | None = None) -> dict[str, Any]:
        """/health: the model and limits, ``params``, and the tokenizer's digest (``esr.serve.vocab``), also of its
        first ``vocab_prefix`` ids when asked (a trainer whose tokenizer is smaller checks the shared ids)."""
        param = next(self.model.parameters())
        info = {
            "status": "ok", "model": self.model_name, "vocab_size": self.vocab_size,
            "tokenizer_size": len(self.tokenizer), "dtype": str(param.dtype).removeprefix("torch."),
            "device": str(param.device), "max_sequence_tokens": self.limits.max_sequence_tokens,
            "max_batch_tokens": self.max_batch_tokens, "max_top_k": self.limits.max_top_k,
            "params": self.params, "tokenizer_sha256": self.vocab_digest(len(self.tokenizer)),
        }
        if vocab_prefix is not None:
            info.update(vocab_prefix=vocab_prefix, vocab_prefix_sha256=self.vocab_digest(vocab_prefix))
        return info

    def vocab_digest(self, n: int) -> str:
        """``esr.serve.vocab.vocab_digest`` of the first n ids, cached (a few sizes are ever asked for)."""
        if n not in self._digests:
            self._digests = {**dict(list(self._digests.items())[-7:]), n: vocab_digest(self.tokenizer, n)}
        return self._digests[n]


def build_app(
    model: nn.Module,
    tokenizer: Any,
    *,
    token: str | None = None,
    model_name: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_top_k: int = DEFAULT_MAX_TOP_K,
) -> Starlette:
    """The ASGI app serving ``model`` (see the module docstring); run it with uvicorn or ``BackgroundServer``."""
    name = model_name or str(getattr(model, "name_or_path", "") or type(model).__name__)
    service = TeacherService(model, tokenizer, model_name=name, max_batch_tokens=max_batch_tokens,
                             max_top_k=max_top_k)
    handlers = _Handlers(service, len(tokenizer), name, max_request_bytes)
    bearer = _BearerToken(token) if token else None
    app = Starlette(
        routes=[
            Route("/health", _endpoint(handlers.health, None), methods=["GET"]),
            Route("/v1/models", _endpoint(handlers.models, bearer), methods=["GET"]),
            Route("/v1/score", _endpoint(handlers.score, bearer), methods=["POST"]),
            Route("/v1/completions", _endpoint(handlers.completions, bearer), methods=["POST"]),
        ],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.teacher = service
    return app


class _BearerToken:
    """The server's token, kept as the digest of its ``Authorization`` header. Digests of equal length, compared in
    constant time: neither the token's content nor its length leaks."""

    def __init__(self, token: str) -> None:
        self._expected = hashlib.sha256(f"Bearer {token}".encode()).digest()

    def admits(self, request: Request) -> bool:
        given = request.headers.get("authorization", "").encode("utf-8", "replace")
        return hmac.compare_digest(hashlib.sha256(given).digest(), self._expected)


def _endpoint(handler: Callable[[Request], Awaitable[Any]], bearer: _BearerToken | None
              ) -> Callable[[Request], Awaitable[Response]]:
    """Auth (when ``bearer`` is given), then the handler; a RequestError becomes its 4xx JSON error, anything else a
    500."""
    async def wrapped(request: Request) -> Response:
        try:
            if bearer is not None and not bearer.admits(request):
                return JSONResponse(error_body(401, "missing or wrong bearer token (Authorization: Bearer <token>)"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            result = await handler(request)
            if isinstance(result, bytes):  # rendered in the worker thread, off the event loop
                return Response(result, media_type="application/json")
            return JSONResponse(result)
        except RequestError as err:
            return JSONResponse(error_body(err.status, err.message), status_code=err.status)
        except ClientDisconnect:  # the client left while sending its body: nobody to answer
            return Response(status_code=400)
        except Exception as err:  # the client gets the reason, the server log the traceback
            log.exception("request to %s failed", request.url.path)
            return JSONResponse(error_body(500, f"internal error: {type(err).__name__}: {err}"), status_code=500)
    return wrapped


class _Handlers:
    """The four endpoints' handlers. Parsing, scoring and formatting run in a worker thread (``run_in_threadpool``),
    so the event loop keeps answering."""

    def __init__(self, service: TeacherService, tokenizer_size: int, name: str, max_request_bytes: int) -> None:
        self.service, self.tokenizer_size, self.name = service, tokenizer_size, name
        self.max_request_bytes = max_request_bytes

    async def health(self, request: Request) -> dict[str, Any]:
        raw = request.query_params.get("vocab_prefix")
        if raw is None:
            return await run_in_threadpool(self.service.describe)  # the first call digests the vocabulary
        if not raw.isdigit() or not 1 <= int(raw) <= self.tokenizer_size:
            raise RequestError(400, f"vocab_prefix must be an integer in [1, {self.tokenizer_size}] (got {raw!r})")
        return await run_in_threadpool(self.service.describe, int(raw))

    async def models(self, request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "esr",
                                            "max_model_len": self.service.limits.max_sequence_tokens}]}

    async def score(self, request: Request) -> bytes:
        body = await read_body(request, self.max_request_bytes)

        def work() -> bytes:
            job = parse_score_request(_json(body), self.service.limits, self.name)
            scores, seconds = self.service.run(job)
            return _dumps(score_response(job, scores, self.name, seconds))
        return await run_in_threadpool(work)

    async def completions(self, request: Request) -> bytes:
        body = await read_body(request, self.max_request_bytes)

        def work() -> bytes:
            job: CompletionJob = parse_completion_request(_json(body), self.service.limits, self.name)
            scores, _ = self.service.run(job.as_score_job(), with_ranks=True, predict_next=job.max_tokens == 1)
            return _dumps(completion_response(job, scores, self.name, self.service.decode))
        return await run_in_threadpool(work)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (404, 405, ...) in the same JSON shape as the endpoints' errors."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return JSONResponse(error_body(status, f"{request.method} {request.url.path}: {detail}"), status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    too_large = f"the request body exceeds this server's limit of {limit} bytes; send fewer sequences per request"
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"bad Content-Length header {declared!r}")
        if int(declared) > limit:
            raise RequestError(413, too_large)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"the body is not valid JSON: {err}") from err


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    spec: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_top_k: int = DEFAULT_MAX_TOP_K,
    trust_remote_code: bool = False,
    log_level: str = "info",
) -> None:
    """Load ``spec`` (any model spec ``esr.models.load_model`` takes) and serve it until interrupted."""
    from esr.models.load import load_model

    if not token and not is_loopback(host):
        log.warning("binding %s without a token: anyone who can reach port %d can use the teacher; set a token "
                    "(esr serve-teacher --token-env VAR) or bind 127.0.0.1", host, port)
    t0 = time.perf_counter()
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    model, tokenizer = load_model(spec, dtype=torch_dtype, device=device, trust_remote_code=trust_remote_code)
    app = build_app(model, tokenizer, token=token, model_name=spec, max_request_bytes=max_request_bytes,
                    max_batch_tokens=max_batch_tokens, max_top_k=max_top_k)
    info = app.state.teacher.describe()
    print(f"esr serve-teacher: {spec} loaded in {time.perf_counter() - t0:.1f} s ({info['vocab_size']} logit "
          f"columns, {info['dtype']}, {info['device']}); auth {'on' if token else 'off'}", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


class BackgroundServer:
    """Run an ASGI app with uvicorn in a daemon thread, on a free port by default (tests, benchmarks, notebooks).

        with BackgroundServer(build_app(model, tokenizer)) as server:
            RemoteTeacher(server.url).score(...)
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.host = host
        self.app = app
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                     lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, name="esr-teacher-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host} within {timeout_s} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
