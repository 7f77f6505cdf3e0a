"""The checks of one part of the config at a time that ``schema._check_consistency`` runs: the loss, a remote
teacher, and the rollout and teacher engines (each number's own range is checked by ``esr.config.ranges``). Kept
apart from the tree itself so ``schema`` stays the list of keys a user reads."""

from __future__ import annotations

import difflib
import typing
from typing import Any

from esr.errors import EsrError


class ConfigError(EsrError, ValueError):
    """A config key is unknown, or a value is invalid or contradicts another."""


TEACHER_SCORE_SELECTORS = ("top-kl-n", "top-teacher-entropy-n", "kl*hs", "ht*hs", "kl*ht*hs")
"""`loss.select` values that rank tokens by the teacher's distribution (KL or H(p_t); ``esr.losses.needed_scores``
names "kl" or "ht" for exactly these): a remote teacher, which returns log p_t of sampled tokens only, cannot."""


def check_remote_teacher(cfg: Any) -> None:
    """With ``teacher.url`` only what needs log p_t of the sampled tokens, or their top-k, can run
    (esr/train/remote_teacher.py)."""
    tc = cfg.teacher
    check_url("teacher.url", tc.url or "", ". Put the bearer token in an environment variable and name it in "
                                           "teacher.token_env")
    if tc.token_env is not None and (not tc.token_env.isidentifier() or not tc.token_env.isascii()):
        raise ConfigError(f"teacher.token_env must name an environment variable (like ESR_TEACHER_TOKEN), not "
                          f"hold the token itself; got a value that is not a variable name ({len(tc.token_env)} chars)")
    check_partial_teacher(cfg, "a remote teacher (teacher.url) returns only log p_t of the sampled tokens and the "
                               "top-k", "or drop teacher.url to load the teacher locally")


def check_partial_teacher(cfg: Any, why: str, instead: str) -> None:
    """A teacher that gives log p_t of the sampled tokens and its top-k, not its distribution (a server at
    ``teacher.url``, ``teacher.engine=vllm``): refuse the loss, selector, cross-tokenizer mode and EffOPD probe that
    need the distribution. ``why`` says what the teacher gives, ``instead`` the other way out (after the fix)."""
    loss = cfg.loss
    if loss.kind not in ("sampled", "topk"):
        raise ConfigError(f"loss.kind={loss.kind} needs the teacher's full distribution, but {why}: set "
                          f"loss.kind=sampled (the policy-gradient estimator of reverse KL) or loss.kind=topk (reverse "
                          f"KL over the teacher's top loss.top_k tokens plus a tail), {instead}")
    if loss.select in TEACHER_SCORE_SELECTORS:
        raise ConfigError(f"loss.select={loss.select} ranks tokens by the teacher's distribution, but {why}: use "
                          f"loss.select=all|first-n|last-n|middle-n|random-n|top-student-entropy-n, {instead}")
    if loss.cross_tokenizer is not None:
        raise ConfigError(f"loss.cross_tokenizer={loss.cross_tokenizer} needs the teacher's tokenizer and hidden "
                          f"states here, but {why}: use a teacher that shares the student's tokenizer (it scores the "
                          f"student's own token ids) and unset loss.cross_tokenizer, {instead}")
    if cfg.rollout.horizon == "auto":
        raise ConfigError(f"rollout.horizon=auto measures the exact per-position KL with the teacher's logits, but "
                          f"{why}: set rollout.horizon=esr (a fixed rollout.n), {instead}")
    x = cfg.optim.extrapolate
    if x.enabled and x.probe == "reverse_kl":
        raise ConfigError(f"optim.extrapolate.probe=reverse_kl computes the exact KL with the teacher's logits, but "
                          f"{why}: set optim.extrapolate.probe=eval (an eval.task metric), "
                          f"optim.extrapolate.enabled=false, {instead}")


def check_auto_horizon(r: Any) -> None:
    """``rollout.horizon=auto`` (the ``rollout`` section ``r``): the starting N and the rule's bounds must fit T."""
    a, t = r.auto, r.max_new_tokens
    n_max = t if a.n_max is None else a.n_max
    if n_max > t:
        raise ConfigError(f"rollout.auto.n_max={n_max} is larger than rollout.max_new_tokens={t}: the probes sample "
                          f"to T, so N cannot exceed it. Lower rollout.auto.n_max or raise rollout.max_new_tokens.")
    if a.n_min > n_max:
        raise ConfigError(f"rollout.auto.n_min={a.n_min} is larger than rollout.auto.n_max={n_max} (None means "
                          f"rollout.max_new_tokens): lower rollout.auto.n_min.")
    if r.n > t:
        raise ConfigError(f"rollout.n={r.n} (auto's starting N) is larger than rollout.max_new_tokens={t}: lower "
                          f"rollout.n or raise rollout.max_new_tokens.")


def check_loss(loss: Any, select_type: Any) -> None:
    """``loss``'s settings: the cross-tokenizer mode against the kind, and the selector (``select_type``: the
    ``Select`` literal; its numbers are checked by their ranges, esr/config/ranges.py)."""
    x, kind = loss.cross_tokenizer, loss.kind
    if x == "aligned-exact" and kind == "sampled":
        raise ConfigError("loss.cross_tokenizer=aligned-exact trains full distributions; with loss.kind=sampled use "
                          "loss.cross_tokenizer=span-sampled (or pick loss.kind=reverse_kl|forward_kl|jsd)")
    if x is not None and kind == "topk":
        raise ConfigError(f"loss.kind=topk compares the teacher's top-k token ids with the student's, which needs one "
                          f"tokenizer; across tokenizers (loss.cross_tokenizer={x}) use loss.kind=reverse_kl with "
                          f"loss.cross_tokenizer=aligned-exact or loss.kind=sampled with span-sampled")
    if x == "span-sampled" and kind not in ("reverse_kl", "sampled"):
        raise ConfigError(f"loss.cross_tokenizer=span-sampled is a sampled estimate of reverse KL; loss.kind={kind} "
                          "needs full distributions: use loss.cross_tokenizer=aligned-exact")
    selectors = typing.get_args(select_type)  # checked here too: a LossConfig built in code skips from_dict's check
    if loss.select not in selectors:
        close = difflib.get_close_matches(str(loss.select), selectors, n=1, cutoff=0.4)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"loss.select={loss.select!r} is not one of {', '.join(selectors)}.{hint}")


VLLM_ENGINES = ("vllm", "vllm-server")


def check_engines(cfg: Any) -> None:
    """The rollout and teacher engines against the rest of the config (esr/rollout/engine.py, esr/teacher/scorer.py).

    What is refused here and why:
    - ``vllm-server`` with ``train.finetune=full``: vLLM 0.32 updates a server's full weights only through its
      weight-transfer engines (``/init_weight_transfer_engine`` + ``/update_weights``, NCCL or CUDA IPC), GPU-only
      and untestable on esr's CPU CI; LoRA adapters go through ``/v1/load_lora_adapter`` and work anywhere.
    - a vLLM rollout engine with ``train.fsdp``: the engine runs beside one training process (colocated) or on its
      own machines (server); sharded training processes would each need the whole weights gathered first.
    - ``hf-compiled`` or ``rollout.dtype`` other than ``auto`` with ``train.fsdp``: both would hold or compile the
      whole student in each process (esr.rollout.sampling_copy, esr.rollout.compiled); untested with sharded layers.
    """
    r, loss = cfg.rollout, cfg.loss
    v = r.vllm
    if r.engine == "vllm-server":
        if v.url is None:
            raise ConfigError("rollout.engine=vllm-server needs rollout.vllm.url, the server's address, e.g. "
                              "rollout.vllm.url=http://127.0.0.1:8000 (start it with python -m "
                              "vllm.entrypoints.openai.api_server --model STUDENT --enable-lora)")
        check_url("rollout.vllm.url", v.url)
        if cfg.train.finetune == "full":
            raise ConfigError("rollout.engine=vllm-server syncs LoRA adapters (train.finetune=lora); vLLM 0.32 loads "
                              "a server's full weights only through its GPU weight-transfer engines (NCCL, CUDA "
                              "IPC), which esr does not drive yet. Use train.finetune=lora, or rollout.engine=vllm "
                              "(colocated: full weights are loaded in place every step)")
    elif v.url is not None:
        raise ConfigError(f"rollout.vllm.url is set but rollout.engine={r.engine}: set rollout.engine=vllm-server to "
                          "sample on that server, or drop rollout.vllm.url")
    if r.engine in VLLM_ENGINES and cfg.train.fsdp:
        raise ConfigError(f"rollout.engine={r.engine} samples beside one training process; train.fsdp shards the "
                          "student over several: use rollout.engine=hf with train.fsdp")
    if cfg.train.fsdp and (r.engine == "hf-compiled" or r.dtype != "auto"):
        raise ConfigError("train.fsdp samples with the sharded student itself (rollout.engine=hf, rollout.dtype=auto): "
                          "a compiled decode step or a sample-dtype copy of the whole student is not supported there")
    if loss.tis_cap is not None:
        if loss.kind != "sampled":
            raise ConfigError(f"loss.tis_cap corrects the sampled estimator (loss.kind=sampled); loss.kind="
                              f"{loss.kind} uses the trainer's own distribution at every position: drop loss.tis_cap")
        if r.engine not in VLLM_ENGINES:
            raise ConfigError(f"loss.tis_cap corrects a vLLM engine's numeric mismatch; rollout.engine={r.engine} "
                              "samples with the trainer's own forward: drop loss.tis_cap or set rollout.engine=vllm")
    check_teacher_engine(cfg)


def check_samples(cfg: Any) -> None:
    """``rollout.samples_per_prompt`` against the batch, and who can sample ``rollout.teacher_share`` of it: a teacher
    loaded here with HF (esr/rollout/mixed.py). Across tokenizers the session refuses it (the tokenizers are read
    there)."""
    r, k, batch = cfg.rollout, cfg.rollout.samples_per_prompt, cfg.train.batch_size
    if batch % k:
        raise ConfigError(f"rollout.samples_per_prompt={k} does not divide train.batch_size={batch}: a step holds "
                          f"batch_size / k prompts sampled k times; set train.batch_size to a multiple of {k}")
    if r.teacher_share == 0:
        return
    tc = cfg.teacher
    where = ("teacher.url (a server)" if getattr(tc, "url", None) is not None
             else "teacher.engine=vllm" if getattr(tc, "engine", "hf") == "vllm" else None)
    if where is not None:
        raise ConfigError(f"rollout.teacher_share={r.teacher_share} samples sequences with the teacher's module, "
                          f"which {where} does not load here: use a local teacher (teacher.engine=hf, no "
                          f"teacher.url) sharing the student's tokenizer, or set rollout.teacher_share=0")
    if cfg.train.fsdp:
        raise ConfigError(f"rollout.teacher_share={r.teacher_share} is not supported with train.fsdp (the sharded "
                          "student's generate must step in every process): set rollout.teacher_share=0")


def check_teacher_engine(cfg: Any) -> None:
    """``teacher.engine`` against the rest: a vLLM teacher gives top-k and sampled-token log-probs only."""
    tc = cfg.teacher
    engine = getattr(tc, "engine", "hf")  # a plain ModelConfig (built in code) is a local hf teacher
    if engine == "vllm-server" and tc.url is None:
        raise ConfigError("teacher.engine=vllm-server needs teacher.url, the server's address, e.g. "
                          "teacher.url=http://127.0.0.1:8001")
    if engine == "vllm-server" and tc.dialect != "openai":
        raise ConfigError("teacher.engine=vllm-server talks to a vLLM server: set teacher.dialect=openai (or "
                          "teacher.engine=hf for a server started with esr serve-teacher)")
    if engine != "vllm":
        return
    if tc.url is not None:
        raise ConfigError("teacher.engine=vllm runs the teacher in this process, but teacher.url names a server: "
                          "set teacher.engine=vllm-server to score on that server, or drop teacher.url")
    hf = "or set teacher.engine=hf"
    check_partial_teacher(cfg, "teacher.engine=vllm gives the teacher's top-k and sampled-token log-probs, not its "
                               "full distribution", hf)
    if cfg.train.fsdp:
        raise ConfigError(f"teacher.engine=vllm scores beside one training process; train.fsdp shards over several: "
                          f"{hf} with train.fsdp")


def check_url(key: str, url: str, credentials_hint: str = "") -> None:
    """An http(s) URL without credentials (they would be written to the run's config.yaml); ``credentials_hint``
    ends that message with where they go instead."""
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0]
    if scheme not in ("http", "https") or not host:
        raise ConfigError(f"{key}={url!r} is not an http(s) URL: write it like http://HOST:8000")
    if "@" in host:
        raise ConfigError(f"{key} must not hold credentials (user:password@): they would be written to the run's "
                          f"config.yaml{credentials_hint}")


MIX_FREE_FIELDS = ("source", "path")
"""`data` fields that name the one source: left at their defaults when `data.mix` is set."""


def check_mix(cfg: Any, data_type: type) -> None:
    """``data.mix`` (esr/data/mix.py): the single-source fields left at their defaults (``data_type``'s), unique
    item names, and no score-based selection (its no-grad pass reads one teacher for the whole batch)."""
    data, default = cfg.data, data_type()
    set_here = [f"data.{k}" for k in MIX_FREE_FIELDS if getattr(data, k) != getattr(default, k)]
    if set_here:
        raise ConfigError(f"data.mix is set, so each item names its own source: drop {', '.join(set_here)} (put them "
                          "in the data.mix items), or drop data.mix for one source")
    names = [mix_name(item) for item in data.mix]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"data.mix has two items named {twice[0]!r}: give them distinct `name`s")
    if cfg.loss.select in TEACHER_SCORE_SELECTORS or cfg.loss.select == "top-student-entropy-n":
        raise ConfigError(f"loss.select={cfg.loss.select} scores the whole batch with one teacher before the loss, "
                          "which data.mix (a teacher per source) does not support yet: use "
                          "loss.select=all|first-n|last-n|middle-n|random-n, or one source")
    if cfg.rollout.teacher_share > 0:
        raise ConfigError(f"rollout.teacher_share={cfg.rollout.teacher_share} samples rows with the teacher, but "
                          "data.mix gives each source its own teacher, which the teacher-sampled rows do not follow "
                          "yet: set rollout.teacher_share=0, or use one source")


def mix_name(item: Any) -> str:
    """A ``data.mix`` item's name: its ``name``, else its source (a ``jsonl`` item: the file's stem)."""
    if item.name:
        return str(item.name)
    if item.source == "jsonl" and item.path:
        return str(item.path).replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".jsonl")
    return str(item.source)
