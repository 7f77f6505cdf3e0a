"""The teacher server's wire protocol: request validation and response shapes (JSON, no HTTP code here).

``POST /v1/score`` (esr's own endpoint)::

    request  {"sequences": [[int, ...], ...],      token ids, each sequence non-empty, ids in [0, vocab_size)
              "start": int | [int, ...],           first position whose token is scored (one for all, or one per
                                                   sequence), 1 <= start <= len(sequence)
              "top_k": int,                        optional, 0 (default) .. max_top_k
              "vocab_size": int,                   optional, 1 .. the server's vocab_size: normalise over the first
                                                   vocab_size logit columns only (scored ids must lie below it)
              "model": str}                        optional; must name the served model
    response {"logprobs": [[float, ...], ...],     per sequence, log p(x_j | x_<j) for j = start .. len - 1
              "top_ids": [[[int, ...], ...], ...], per sequence and scored position, the top_k most likely ids,
              "top_logprobs": [[[float]]],         most likely first, and their log-probs ([] per sequence if top_k=0)
              "model": str, "seconds": float}      seconds spent running the model for this request

Everything is at temperature 1 and normalised over the teacher's whole output layer (or its first ``vocab_size``
columns when the request says so: the trainer sends the columns the student shares with the teacher, as the local
path normalises), the quantity the sampled reverse-KL loss needs (``esr.losses.sampled``). A server that predates
``vocab_size`` refuses it as an unknown key (400), so clients send it only when it is below the server's.

``POST /v1/completions`` (the subset of vLLM's OpenAI-compatible endpoint that scores prompts)::

    request  {"model": str (optional; must name the served model),
              "prompt": [int, ...] | [[int, ...], ...],   token ids only (text prompts are refused)
              "max_tokens": 0 | 1,                        1 also returns the most likely next token (greedy)
              "prompt_logprobs": int,                     k in 0 .. max_top_k
              "echo": bool, "return_token_ids": bool}     optional; other sampling fields are ignored
    response {"id": "cmpl-...", "object": "text_completion", "created": int, "model": str,
              "choices": [{"index": i, "text": str, "logprobs": null, "finish_reason": "length",
                           "stop_reason": null, "token_ids": [int] | null, "prompt_token_ids": [int] | null,
                           "prompt_logprobs": [null, {"<token id>": {"logprob": float, "rank": int,
                                                                     "decoded_token": str}, ...}, ...]}],
              "usage": {"prompt_tokens": int, "completion_tokens": int, "total_tokens": int}}

``prompt_logprobs`` has one entry per prompt token: null for the first (nothing predicts it), then a dict keyed by
token id (a string, as JSON keys are) holding the prompt token itself (its ``rank`` among all tokens, 1 = most
likely, ties counted against it) and the k most likely tokens (ranks 1..k), so k or k + 1 entries; log-probs below
-9999 are written as -9999.0. This is vLLM's shape (``CompletionResponseChoice.prompt_logprobs``, a list of
``dict[int, Logprob]``), so one client reads both servers. vLLM's prompt log-probs are also raw (untempered).

Errors are ``{"error": {"message": str, "type": str, "code": int}}`` with a 4xx status for a bad request
(400 invalid, 401 missing or wrong bearer token, 404 unknown model or path, 413 body too large) and 500 for a
failure inside the server.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from esr.serve.scoring import SequenceScores

LOGPROB_FLOOR = -9999.0
"""What vLLM (and OpenAI) write for log-probs of -inf: JSON has no infinity."""

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
                413: "RequestTooLarge", 500: "InternalServerError"}


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP status and the message says what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "code": status}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    vocab_size: int
    """Token ids must lie in [0, vocab_size): the columns of the teacher's logits."""
    max_sequence_tokens: int
    """Longest sequence accepted (at most max_batch_tokens, and the model's context length)."""
    max_top_k: int
    """Largest top_k / prompt_logprobs."""


@dataclass(frozen=True)
class ScoreJob:
    """A validated request: what to run through the model."""

    sequences: list[list[int]]
    starts: list[int]
    top_k: int
    vocab_size: int | None = None
    """Normalise over the first vocab_size logit columns (None: all of them)."""


@dataclass(frozen=True)
class CompletionJob:
    """A validated /v1/completions request."""

    prompts: list[list[int]]
    top_k: int | None
    """prompt_logprobs (None: the caller did not ask for them)."""
    max_tokens: int
    echo: bool
    return_token_ids: bool

    def as_score_job(self) -> ScoreJob:
        return ScoreJob(self.prompts, [1] * len(self.prompts), self.top_k or 0)


def parse_score_request(payload: Any, limits: Limits, model_name: str) -> ScoreJob:
    """Validate a /v1/score body; raises ``RequestError(400, ...)`` naming the first problem found."""
    if not isinstance(payload, dict):
        raise RequestError(400, "the body must be a JSON object with keys sequences, start and top_k")
    unknown = sorted(set(payload) - {"sequences", "start", "top_k", "vocab_size", "model"})
    if unknown:
        raise RequestError(400, f"unknown key(s) {unknown}; /v1/score takes sequences, start, top_k (and vocab_size, "
                                "model)")
    _check_model(payload.get("model"), model_name)
    sequences = _sequences(payload.get("sequences"), "sequences", limits)
    start = payload.get("start")
    if _is_int(start):
        starts = [start] * len(sequences)
    elif isinstance(start, list) and len(start) == len(sequences) and all(_is_int(s) for s in start):
        starts = list(start)
    else:
        raise RequestError(400, f"start must be an int or a list of {len(sequences)} ints (one per sequence): the "
                                "first position whose token is scored")
    for i, (seq, s) in enumerate(zip(sequences, starts, strict=True)):
        if not 1 <= s <= len(seq):
            raise RequestError(400, f"start[{i}] = {s} is out of range: it must be >= 1 (position 0 has nothing "
                                    f"before it to predict it) and <= len(sequences[{i}]) = {len(seq)}")
    vocab_size = _vocab_size(payload.get("vocab_size"), sequences, starts, limits)
    top_k = _top_k(payload.get("top_k", 0), "top_k", limits)
    if vocab_size is not None and top_k > vocab_size:
        raise RequestError(400, f"top_k={top_k} exceeds vocab_size={vocab_size}")
    return ScoreJob(sequences, starts, top_k, vocab_size)


def parse_completion_request(payload: Any, limits: Limits, model_name: str) -> CompletionJob:
    """Validate a /v1/completions body (the prompt-scoring subset; see the module docstring)."""
    if not isinstance(payload, dict):
        raise RequestError(400, "the body must be a JSON object (an OpenAI completions request)")
    _check_model(payload.get("model"), model_name)
    prompt = payload.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
        raise RequestError(400, "esr's teacher server takes token ids in prompt, not text: tokenize on the client")
    prompts = [prompt] if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt) else prompt
    prompts = _sequences(prompts, "prompt", limits)
    max_tokens = payload.get("max_tokens", 16)
    if max_tokens not in (0, 1) or isinstance(max_tokens, bool):
        raise RequestError(400, f"max_tokens must be 0 or 1 (got {max_tokens!r}): esr's teacher server scores "
                                "prompts and generates at most one (greedy) token")
    if payload.get("logprobs") is not None:
        raise RequestError(400, "logprobs (per generated token) is not supported: ask for prompt_logprobs")
    if payload.get("stream"):
        raise RequestError(400, "stream is not supported")
    if payload.get("n", 1) != 1:
        raise RequestError(400, "n must be 1")
    raw_k = payload.get("prompt_logprobs")
    top_k = None if raw_k is None else _top_k(raw_k, "prompt_logprobs", limits)
    return CompletionJob(prompts, top_k, max_tokens, _flag(payload, "echo"), _flag(payload, "return_token_ids"))


def score_response(job: ScoreJob, scores: Sequence[SequenceScores], model_name: str, seconds: float) -> dict:
    return {
        "model": model_name,
        "logprobs": [_floats(s.logprobs.tolist()) for s in scores],
        "top_ids": [s.top_ids.tolist() if job.top_k else [] for s in scores],
        "top_logprobs": [[_floats(row) for row in s.top_logprobs.tolist()] if job.top_k else [] for s in scores],
        "seconds": seconds,
    }


def completion_response(
    job: CompletionJob, scores: Sequence[SequenceScores], model_name: str, decode: Callable[[Sequence[int]], str]
) -> dict:
    """vLLM's completion response; ``decode`` turns token ids into text (one id: that token's decoded_token)."""
    choices = []
    for i, (prompt, s) in enumerate(zip(job.prompts, scores, strict=True)):
        generated = [s.next_id] if job.max_tokens == 1 and s.next_id is not None else []
        text = (decode(prompt) if job.echo else "") + (decode(generated) if generated else "")
        choices.append({
            "index": i, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None,
            "token_ids": generated if job.return_token_ids else None,
            "prompt_token_ids": prompt if job.return_token_ids else None,
            "prompt_logprobs": _prompt_logprobs(prompt, s, decode) if job.top_k is not None else None,
        })
    n_prompt = sum(len(p) for p in job.prompts)
    n_generated = job.max_tokens * len(job.prompts)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
        "model": model_name, "choices": choices,
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_generated, "total_tokens": n_prompt + n_generated},
    }


def _prompt_logprobs(prompt: list[int], s: SequenceScores, decode: Callable[[Sequence[int]], str]) -> list:
    """[None, {id: {logprob, rank, decoded_token}}, ...]: the prompt token first, then the top-k (vLLM's order;
    when the prompt token is among the top-k its entry takes the top-k rank, as in vLLM)."""
    out: list[dict[str, dict[str, Any]] | None] = [None]
    ranks = s.ranks.tolist() if s.ranks is not None else [None] * len(s.logprobs)
    for j, (lp, rank, ids, lps) in enumerate(
        zip(s.logprobs.tolist(), ranks, s.top_ids.tolist(), s.top_logprobs.tolist(), strict=True), start=1
    ):
        token = prompt[j]
        entry = {str(token): _logprob_entry(lp, rank, decode([token]))}
        for r, (tid, tlp) in enumerate(zip(ids, lps, strict=True), start=1):
            entry[str(tid)] = _logprob_entry(tlp, r, decode([tid]))
        out.append(entry)
    return out


def _logprob_entry(logprob: float, rank: int | None, decoded: str) -> dict[str, Any]:
    return {"logprob": _float(logprob), "rank": rank, "decoded_token": decoded}


def _float(x: float) -> float:
    if math.isnan(x):
        raise ValueError("the model produced NaN log-probs")
    return max(x, LOGPROB_FLOOR)


def _floats(xs: list[float]) -> list[float]:
    return [_float(x) for x in xs]


def _check_model(model: Any, model_name: str) -> None:
    if model is not None and model != model_name:
        raise RequestError(404, f"the model `{model}` does not exist; this server serves `{model_name}`")


def _sequences(value: Any, name: str, limits: Limits) -> list[list[int]]:
    if not isinstance(value, list) or not value:
        raise RequestError(400, f"{name} must be a non-empty list of token-id lists")
    for i, seq in enumerate(value):
        if not isinstance(seq, list) or not seq:
            raise RequestError(400, f"{name}[{i}] must be a non-empty list of token ids")
        if len(seq) > limits.max_sequence_tokens:
            raise RequestError(400, f"{name}[{i}] has {len(seq)} tokens; this server takes at most "
                                    f"{limits.max_sequence_tokens} per sequence")
        for j, t in enumerate(seq):
            if not _is_int(t):
                raise RequestError(400, f"{name}[{i}][{j}] = {t!r} is not a token id (an integer)")
        lo, hi = min(seq), max(seq)
        if lo < 0 or hi >= limits.vocab_size:
            bad = lo if lo < 0 else hi
            raise RequestError(400, f"{name}[{i}][{seq.index(bad)}] = {bad} is outside the vocabulary: token ids "
                                    f"must lie in [0, {limits.vocab_size})")
    return value


def _vocab_size(value: Any, sequences: list[list[int]], starts: list[int], limits: Limits) -> int | None:
    """The optional column limit of /v1/score: an int in [1, limits.vocab_size], above every scored token id."""
    if value is None:
        return None
    if not _is_int(value) or not 1 <= value <= limits.vocab_size:
        raise RequestError(400, f"vocab_size must be an integer in [1, {limits.vocab_size}] (got {value!r}): the "
                                "logit columns to normalise over")
    for i, (seq, s) in enumerate(zip(sequences, starts, strict=True)):
        scored = seq[s:]
        if scored and max(scored) >= value:
            j = s + scored.index(max(scored))
            raise RequestError(400, f"sequences[{i}][{j}] = {seq[j]} is scored but lies outside the first "
                                    f"vocab_size={value} columns")
    return value


def _top_k(value: Any, name: str, limits: Limits) -> int:
    if not _is_int(value) or not 0 <= value <= limits.max_top_k:
        raise RequestError(400, f"{name} must be an integer in [0, {limits.max_top_k}] (got {value!r})")
    return value


def _flag(payload: dict, key: str) -> bool:
    value = payload.get(key)
    if value is not None and not isinstance(value, bool):
        raise RequestError(400, f"{key} must be true or false")
    return bool(value)


def _is_int(x: Any) -> bool:
    return type(x) is int  # JSON true/false arrive as bool, a subclass of int: not token ids
