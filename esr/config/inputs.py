"""The run's inputs: the student and teacher models and the prompt data (sections of ``esr.config.schema.Config``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from esr.config.ranges import POSITIVE, SEED, at_least, ranged

TeacherEngine = Literal["hf", "vllm", "vllm-server"]


@dataclass(frozen=True)
class ModelConfig:
    name: str = "qwen2.5-coder-0.5b-instruct"
    """A zoo preset (`esr models`), a local folder, or a hub id."""
    trust_remote_code: bool = False
    """Run Python shipped with a hub model. Off unless you trust the model's authors."""
    allow_pickle: bool = False
    """Load pickle weights (`pytorch_model.bin`, `.pt`, `.pth`, `.ckpt`) when a folder or hub id has no safetensors.
    Off because unpickling a file can run code hidden in it; convert such a model to safetensors where you can."""


@dataclass(frozen=True)
class TeacherConfig(ModelConfig):
    """The teacher: a model loaded locally (``name``), or a server that scores tokens (``url``; then ``name`` is only
    what the messages suggest serving). The remote fields mean nothing for the student, so they live here."""

    url: str | None = None
    """http(s) URL of a teacher server (`esr serve-teacher MODEL`, or `vllm serve` with dialect openai), e.g.
    `http://10.0.0.5:8000`. Set: the teacher is not loaded locally and only `loss.kind=sampled|topk` work (the server
    returns log p_t of the sampled tokens and the top-k, not the distribution). No credentials in it: see
    `token_env`."""
    dialect: Literal["esr", "openai"] = "esr"
    """`esr` (esr's /v1/score) or `openai` (vLLM's /v1/completions with prompt_logprobs)."""
    model: str | None = None
    """The served model's name sent in openai-dialect requests (vLLM wants it); None: the server's first model."""
    token_env: str | None = None
    """Name of the environment variable holding the server's bearer token (never the token itself). None:
    ESR_TEACHER_TOKEN when it is set, else no token (as `esr serve-teacher` does)."""
    timeout_s: float = ranged(120.0, POSITIVE)
    """Seconds a request may wait for the server's answer before the step fails (not retried)."""
    retries: int = ranged(10, at_least(0))
    """Retries of a request after a connection error, a 5xx or a 429, with exponential backoff (0.5 s doubling, at
    most 30 s between tries, jittered): 10 wait about 150 s (at least 75 s), long enough for a server to restart."""
    max_batch_sequences: int = ranged(16, at_least(1))
    """Sequences per HTTP request (a step's batch is sent in several requests when larger)."""
    engine: TeacherEngine = "hf"
    """What scores the rollouts: `hf` (the teacher loaded here, full distribution: every loss.kind; with
    `teacher.url`, a server as `dialect` says), `vllm` (an in-process vLLM engine, esr/teacher/vllm_score.py: the
    teacher is never loaded with HF; its `prompt_logprobs`, top-`loss.top_k`, feed loss.kind=topk|sampled; same
    tokenizer as the student only; KV cache `rollout.vllm.kv_cache_gib`, context `rollout.vllm.max_model_len`) or
    `vllm-server` (a vLLM server at `teacher.url`, needs `teacher.dialect=openai`: loss.kind=sampled|topk; its
    `--max-logprobs`, default 20, bounds `loss.top_k`)."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "gsm_symbolic"
    """`gsm_symbolic` (offline generator), `gsm8k`, `math`, `jsonl` (prompt rows, or messages rows with optional
    tools), `glaive` (glaive-function-calling-v2 rows), `bfcl:<category>[,<category>]` (BFCL questions, rendered as
    the `bfcl:*` evaluation renders them), or `hf:<dataset>`."""
    path: str | None = None
    """JSONL file for `gsm8k`, `math`, `jsonl` and `glaive` sources."""
    split: str = "train"
    """Split for `hf:` sources."""
    size: int = ranged(2000, at_least(1))
    """How many problems the `gsm_symbolic` generator makes."""
    limit: int | None = ranged(None, at_least(1))
    """Use at most this many rows (after skipping malformed ones)."""
    seed: int = ranged(0, SEED)
    """Seed of the generator and of the prompt order."""
    system_prompt: str | None = None
    """Optional system message put before every prompt."""
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    """Appended to each math question (not to `jsonl` prompts, which are used as written)."""
    max_prompt_tokens: int = ranged(512, at_least(1))
    """Prompts longer than this (in student tokens) are skipped and counted."""
    mix: tuple[MixSource, ...] = ()
    """Several weighted sources instead of the one above (`esr/data/mix.py`): a list of items with the source fields
    (`source`, `path`, `split`, `size`, `limit`, `instruction`) plus `weight`, `name` and their own `teacher`. Each
    step's batch takes rows from every source in proportion to its weight; each row is scored by its source's teacher.
    Set: leave `data.source` and `data.path` at their defaults; `data.split`, `size`, `limit` and `instruction` are
    the items' defaults, and `seed`, `system_prompt` and `max_prompt_tokens` apply to every item."""


@dataclass(frozen=True)
class MixSource:
    """One item of ``data.mix``: a prompt source, its weight and the teacher that scores its rows."""

    source: str = "gsm_symbolic"
    """As `data.source`."""
    path: str | None = None
    """As `data.path`."""
    split: str | None = None
    """As `data.split`; None: `data.split`."""
    size: int | None = ranged(None, at_least(1))
    """As `data.size`; None: `data.size`."""
    limit: int | None = ranged(None, at_least(1))
    """As `data.limit`; None: `data.limit`."""
    instruction: str | None = None
    """As `data.instruction`; None: `data.instruction`."""
    weight: float = ranged(1.0, POSITIVE)
    """Relative share of each batch's rows drawn from this source (weights are normalised over the mix)."""
    name: str | None = None
    """Name in metrics (`by_source` in metrics.jsonl) and run.json; None: the source (`gsm8k`, `hf:org/set`, or the
    file name of a `jsonl` path). Names must be unique within the mix."""
    teacher: TeacherConfig | None = None
    """The teacher that scores this source's rows (a section like the top-level `teacher`); None: the top-level
    teacher. Same or another tokenizer than the student, local or a server."""
