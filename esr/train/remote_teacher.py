"""The teacher on another machine (``teacher.url``): connect, check it against the student, fetch log p_t per step.

    esr serve-teacher qwen2.5-coder-1.5b-instruct --host 0.0.0.0      # the teacher's machine (esr/serve/server.py)
    esr train configs/quickstart.yaml teacher.url=http://HOST:8000 loss.kind=sampled

What a remote teacher returns is log p_t(y_t) of each sampled token (``RemoteTeacher.score_rollouts``), (B, R), and
when asked its top-k ids and log-probs, (B, R, K), not the distribution, so ``loss.kind=sampled`` and
``loss.kind=topk`` run (the config refuses the rest: ``check_remote_teacher`` in esr/config/checks.py).
``RemoteScorer`` is the run's ``TeacherScorer`` (``esr.teacher.scorer``): its targets are ``TokenLogprobTargets``
(sampled) or ``TopKTargets`` (topk, k = ``loss.top_k``; ``esr.teacher.targets``), trained by the same micro-batch
loss path as a local teacher's. With esr's server (normalised over the shared columns) both give a local teacher's
values to float precision; with vLLM (openai dialect, ``teacher.engine=vllm-server``) see normalisation below (top
ids past the student's columns are no buckets: ``esr.losses.mask_top_columns``). A vLLM server answers at most
``--max-logprobs`` (default 20) top-k; esr's at most its ``max_top_k`` (checked at startup).

Startup (``connect_remote_teacher``, before any model loads, so a wrong URL costs seconds, not a model load):
``/health`` once without retries, with a message naming the URL and the ``esr serve-teacher`` command when nothing
answers. Then, with the student loaded (``RemoteScorer.check_student``):

- vocabulary: the server's tokenizer must be the student's id space. esr's server publishes a digest of its
  tokenizer (``esr.serve.vocab``); the digests of the smaller tokenizer's ids must agree (one vocabulary may extend
  the other, as on the local path). vLLM exposes no tokenizer: a warning says it is assumed, not checked.
- normalisation: the local path normalises the teacher over the V logit columns both models have
  (``shared_vocab_size``: min of the two output layers). esr's server normalises over its whole output layer
  unless the request says ``vocab_size``; the trainer sends V whenever V is below the server's width, so the
  advantage log p_t(y) - log p_s(y) is the local path's to float precision. vLLM (openai dialect) cannot be
  asked: its log p_t is over its whole output layer, log p_t^full(y) = log p_t^V(y) + log Z_t with
  Z_t = the teacher's mass on the first V columns (<= 1; = 1 when the widths agree). log Z_t is the same for every
  y at a position, so it is a baseline: E_{y~p_s}[log Z_t grad log p_s(y)] = 0 and the expected gradient is
  unchanged (only its variance moves); the sampled KL metric reads higher by -E[log Z_t] >= 0.
- lengths: esr's server refuses sequences over its ``max_sequence_tokens``; a run whose prompt budget plus
  ``rollout.max_new_tokens`` could pass it is refused now rather than at some later step.
- token and request shape: one tiny scoring request, so a wrong bearer token or a server that predates
  ``vocab_size`` fails now.

Per step, ``RemoteScorer.targets`` scores the whole batch once (``teacher_logprobs``) (requests of
``teacher.max_batch_sequences`` rows) and every micro-batch slices it; its wall seconds go to ``seconds``, which the
loop reports as ``seconds_score``. ``teacher_params`` (for ``flops_score``) is the server's ``params`` (0 for vLLM).

Mid-run failures: a connection error, a 5xx or a 429 is retried ``teacher.retries`` times with exponential backoff
(``esr.http``; the default, 10, waits about 150 s, at least 75 s: a teacher server that restarts in that time costs
the step nothing, as scoring is idempotent). After that the step fails with ``RemoteTeacherError`` naming
``teacher.url``, the request and the last failure (the server's status and message, or the connection error); the
loop adds the step, the last checkpoint and ``esr train --resume RUN`` (``esr.train.engine_failure``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import torch
from torch import nn

from esr.config import Config, ConfigError, TeacherConfig
from esr.losses import mask_top_columns
from esr.serve import DEFAULT_TOKEN_ENV
from esr.serve.errors import RemoteTeacherError
from esr.serve.vocab import vocab_digest
from esr.teacher.scorer import TOPK_KINDS, Capabilities, TeacherBatch
from esr.teacher.targets import TokenLogprobTargets, TopKTargets
from esr.types import Rollouts

if TYPE_CHECKING:
    from esr.serve.client import RolloutScores

log = logging.getLogger("esr.train")

HEALTH_TIMEOUT_S = 10.0
"""Longest wait for the startup health check (connection and answer); it is not retried."""


def public_url(url: str) -> str:
    """``url`` without user, password, query or fragment: what run.json and messages show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def bearer_token(tc: TeacherConfig) -> str | None:
    """The token from ``teacher.token_env`` (which must then be set), else ESR_TEACHER_TOKEN if set, else None."""
    if tc.token_env is None:
        return os.environ.get(DEFAULT_TOKEN_ENV) or None
    token = os.environ.get(tc.token_env)
    if not token:
        raise ConfigError(f"teacher.token_env={tc.token_env}: that environment variable is not set or empty; export "
                          f"it with the teacher server's bearer token")
    return token


def start_command(tc: TeacherConfig) -> str:
    """The command that starts a server answering at ``tc.url`` (for error messages)."""
    port = urlsplit(tc.url or "").port or (443 if (tc.url or "").startswith("https") else 80)
    if tc.dialect == "openai":
        return f"vllm serve {tc.model or tc.name} --port {port}"
    env = tc.token_env or DEFAULT_TOKEN_ENV
    return f"{env}=<token> esr serve-teacher {tc.name} --host 0.0.0.0 --port {port}"


class RemoteScorer:
    """The run's teacher when it is a server: a ``RemoteTeacher`` client, the checks, and one batch's log p_t.

    A ``TeacherScorer`` (``Session.scorer``); ``seconds`` counts the wall time of scoring requests (the loop resets
    it each step and reports it as ``seconds_score``).
    """

    capabilities = Capabilities(loss_kinds=TOPK_KINDS, scores=frozenset({"hs"}),
                                where="with a remote teacher (teacher.url)")

    def __init__(self, tc: TeacherConfig, health: dict[str, Any]) -> None:
        from esr.serve.client import RemoteTeacher  # needs requests, which only remote runs need

        self.config = tc
        self.url = public_url(tc.url or "")
        self.health = health
        self._token = bearer_token(tc)
        self.client = RemoteTeacher(tc.url or "", token=self._token, timeout_s=tc.timeout_s,
                                    retries=tc.retries, max_batch_sequences=tc.max_batch_sequences,
                                    dialect=tc.dialect, model=tc.model)
        self.seconds = 0.0
        self.vocab_size: int | None = None
        """V: the logit columns log p_t is normalised over (the student's, bounded by the server's width)."""
        self.request_vocab_size: int | None = None
        """V when it is below the server's width (then sent with every request), else None."""
        self.tokenizer_checked = False
        self._rollouts: Rollouts | None = None
        self._scores: RolloutScores | None = None
        self.top_k = 0
        """K asked per position: ``loss.top_k`` with ``loss.kind=topk`` (set by ``check_student``), else 0."""

    # --- startup ------------------------------------------------------------------------------------------------

    def check_student(self, tokenizer: Any, student: nn.Module, cfg: Config) -> int:
        """Check the server against the student (module docstring); returns V, the columns the loss uses."""
        tc, h = self.config, self.health
        rows = int(student.get_output_embeddings().weight.shape[0])
        self.top_k = cfg.loss.top_k if cfg.loss.kind == "topk" else 0
        limit_k = h.get("max_top_k")
        if tc.dialect == "esr" and isinstance(limit_k, int) and self.top_k > limit_k:
            raise ConfigError(f"loss.top_k={self.top_k} but the teacher server at {self.url} answers at most "
                              f"{limit_k}: lower loss.top_k, or restart it with --max-top-k {self.top_k}")
        if tc.dialect == "esr":
            server_width = int(h["vocab_size"])
            self.vocab_size = min(rows, server_width)
            self.request_vocab_size = self.vocab_size if self.vocab_size < server_width else None
            self._check_tokenizer(tokenizer)
            budget = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
            limit = h.get("max_sequence_tokens")
            if isinstance(limit, int) and budget > limit:
                raise ConfigError(
                    f"the teacher server at {self.url} takes sequences of at most {limit} tokens, but a prompt of up "
                    f"to data.max_prompt_tokens={cfg.data.max_prompt_tokens} plus rollout.max_new_tokens="
                    f"{cfg.rollout.max_new_tokens} may reach {budget}: lower them, or restart the server with "
                    f"--max-batch-tokens {budget} or more")
        else:
            self.vocab_size = rows
            log.warning("teacher.dialect=openai: the server (%s at %s) exposes no tokenizer, so esr assumes, without "
                        "checking, that it uses the student's token ids; its log-probs are normalised over its whole "
                        "vocabulary (see esr/train/remote_teacher.py)", h.get("model"), self.url)
        if len(tokenizer) > self.vocab_size:
            raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the logits both models define have only "
                              f"{self.vocab_size} columns (student {rows}, teacher server {h.get('vocab_size')})")
        self._probe_request()
        return self.vocab_size

    def _check_tokenizer(self, tokenizer: Any) -> None:
        h = self.health
        theirs_size = h.get("tokenizer_size")
        if "tokenizer_sha256" not in h or not isinstance(theirs_size, int):
            log.warning("the teacher server at %s publishes no tokenizer digest (an older esr): only its width "
                        "(%s columns) was checked against the student's", self.url, h.get("vocab_size"))
            return
        n = min(len(tokenizer), theirs_size)
        theirs = (h["tokenizer_sha256"] if n == theirs_size
                  else self._health(vocab_prefix=n).get("vocab_prefix_sha256"))
        if vocab_digest(tokenizer, n) != theirs:
            raise ConfigError(
                f"the teacher server at {self.url} ({h.get('model')}) uses another tokenizer than the student (their "
                f"first {n} token ids differ). A remote teacher must share the student's tokenizer: serve a teacher "
                f"of the student's family, or drop teacher.url and set loss.cross_tokenizer to distil across "
                f"tokenizers with a local teacher")
        if len(tokenizer) != theirs_size:
            log.warning("the %s's vocabulary extends the other's by %d tokens; log p_t is compared on the shared ids",
                        "teacher" if theirs_size > len(tokenizer) else "student", abs(theirs_size - len(tokenizer)))
        self.tokenizer_checked = True

    def _health(self, vocab_prefix: int | None = None) -> dict[str, Any]:
        from esr.serve.client import RemoteTeacher

        with RemoteTeacher(self.config.url or "", token=self._token,
                           timeout_s=min(self.config.timeout_s, HEALTH_TIMEOUT_S), retries=0,
                           dialect=self.config.dialect, model=self.config.model) as probe:
            return probe.health(vocab_prefix)

    def _probe_request(self) -> None:
        """One two-token scoring request: the token, the dialect and the request fields work before step 1."""
        try:
            self.client.score([[0, 0]], 1, 0, self.request_vocab_size)
        except RemoteTeacherError as err:
            tc = self.config
            if err.status == 401:
                raise RemoteTeacherError(
                    f"the teacher server at {self.url} refused the bearer token: set "
                    f"{tc.token_env or DEFAULT_TOKEN_ENV} to the token the server was started with (teacher.token_env "
                    f"names the variable)", 401) from None
            if err.status == 400 and "vocab_size" in str(err):
                raise RemoteTeacherError(
                    f"the teacher server at {self.url} does not take the vocab_size field this run needs (its output "
                    f"layer is wider than the student's {self.vocab_size} columns): upgrade esr on the teacher's "
                    "machine", 400) from None
            raise RemoteTeacherError(f"the teacher server at {self.url} failed a test request: {err}. Check "
                                     f"teacher.url and teacher.dialect={tc.dialect}", err.status) from None
        self.client.seconds = 0.0

    def describe(self) -> dict[str, Any]:
        """What run.json records about the teacher (no token, no credentials)."""
        h = self.health
        return {"remote": True, "url": self.url, "dialect": self.config.dialect, "model": h.get("model"),
                "server_vocab_size": h.get("vocab_size"), "normalised_columns": self.vocab_size,
                "sends_vocab_size": self.request_vocab_size is not None, "tokenizer_checked": self.tokenizer_checked,
                "dtype": h.get("dtype"), "device": h.get("device")}

    @property
    def params(self) -> int:
        """The served model's parameter count (esr's /health says it; 0 when unknown)."""
        return int(self.health.get("params") or 0)

    # --- per step ----------------------------------------------------------------------------------------------

    def read(self, rollouts: Rollouts, prompt_index: Sequence[int]) -> TeacherBatch:
        """The server reads the student's own tokens: every response token can be scored."""
        return TeacherBatch(rollouts=rollouts, teacher_rollouts=rollouts, valid_B_R=rollouts.response_mask_B_R)

    def targets(self, batch: TeacherBatch, micro_batch_size: int,
                rows_per_pass: int | None = None) -> Iterator[TokenLogprobTargets | TopKTargets]:
        """Each micro-batch's rows of the batch's log p_t, (b, R_mb) (and top-k, (b, R_mb, K), when ``top_k``),
        fetched once for the whole batch when the first micro-batch asks (requests of
        ``teacher.max_batch_sequences`` rows; ``rows_per_pass`` is unused)."""
        rollouts = batch.rollouts
        for a in range(0, len(rollouts), micro_batch_size):
            n_resp = rollouts.slice(a, a + micro_batch_size).response_mask_B_R.shape[1]
            s = self.teacher_scores(rollouts)
            rows, cols = slice(a, a + micro_batch_size), slice(0, n_resp)
            if not self.top_k:
                yield TokenLogprobTargets(teacher_logp_B_R=s.logprobs_B_R[rows, cols])
            else:
                yield TopKTargets(s.logprobs_B_R[rows, cols], s.top_ids_B_R_K[rows, cols],
                                  s.top_logprobs_B_R_K[rows, cols])

    def teacher_logprobs(self, rollouts: Rollouts) -> torch.Tensor:
        """log p_t of every sampled response token of the step's whole batch, (B, R) float32 on the CPU (0 where
        ``response_mask_B_R`` is False)."""
        return self.teacher_scores(rollouts).logprobs_B_R

    def teacher_scores(self, rollouts: Rollouts) -> RolloutScores:
        """The step's whole batch scored (``RemoteTeacher.score_rollouts`` with ``top_k``; top ids past the
        student's columns masked). Fetched once per batch object; later calls with it reuse the answer."""
        if rollouts is not self._rollouts:
            t0 = time.perf_counter()
            try:
                scores = self.client.score_rollouts(rollouts, self.top_k, self.request_vocab_size)
            except RemoteTeacherError as err:
                raise RemoteTeacherError(f"the teacher server (teacher.url) failed: {err}", err.status) from err
            if self.top_k and self.vocab_size is not None:
                ids_B_R_K, top_B_R_K = mask_top_columns(scores.top_ids_B_R_K, scores.top_logprobs_B_R_K,
                                                        self.vocab_size)
                scores = scores._replace(top_ids_B_R_K=ids_B_R_K, top_logprobs_B_R_K=top_B_R_K)
            self.seconds += time.perf_counter() - t0
            self._rollouts, self._scores = rollouts, scores
        assert self._scores is not None
        return self._scores


def connect_remote_teacher(cfg: Config) -> RemoteScorer:
    """Reach ``teacher.url`` once, without retries (module docstring); raises ``RemoteTeacherError`` with the URL
    and the command that starts a server when nothing answers."""
    try:
        from esr.serve.client import RemoteTeacher
    except ModuleNotFoundError as err:
        raise ConfigError(f"teacher.url needs the HTTP client ({err.name} is missing): pip install "
                          "'esr-distill[serve]'") from None

    tc = cfg.teacher
    url = public_url(tc.url or "")
    try:
        with RemoteTeacher(tc.url or "", token=bearer_token(tc), timeout_s=min(tc.timeout_s, HEALTH_TIMEOUT_S),
                           retries=0, dialect=tc.dialect, model=tc.model) as probe:
            health = probe.health()
    except RemoteTeacherError as err:
        if err.status is None:
            message = (f"no teacher server answers at teacher.url={url} ({err}). Start one on the teacher's machine "
                       f"with `{start_command(tc)}`, check that this machine can reach it, or drop teacher.url to "
                       f"load the teacher locally")
        elif err.status == 401:
            message = (f"the teacher server at {url} refused the bearer token: set "
                       f"{tc.token_env or DEFAULT_TOKEN_ENV} to the server's token (teacher.token_env names it)")
        else:
            message = (f"{url} answered, but not as a teacher server of dialect {tc.dialect} ({err}): check "
                       f"teacher.url and teacher.dialect (esr for `esr serve-teacher`, openai for `vllm serve`)")
        raise RemoteTeacherError(message, err.status) from None
    if tc.dialect == "esr" and not isinstance(health.get("vocab_size"), int):
        raise RemoteTeacherError(f"{url}/health does not describe an esr teacher server (no vocab_size): with vLLM "
                                 "set teacher.dialect=openai")
    return RemoteScorer(tc, health)
