"""One TRL arm of benchmarks/vs_trl.py: a few real training steps of a TRL trainer, timed, in its own process.

Runs in the TRL virtual environment (benchmarks/requirements-trl.txt), never imports esr, and is started by
benchmarks/vs_trl.py, which hands it a JSON spec (model folders, the exact prompts of every step as chat messages
and token ids, the settings) and reads back a JSON result:

    /work/venvs/trl/bin/python benchmarks/trl_arm.py SPEC.json RESULT.json

Trainers (spec "trainer"):
- "distill": trl.DistillationTrainer (TRL's stable on-policy distillation trainer: student samples with HF
  `generate`, KV cache on, then a chunked generalised-JSD loss over hidden states, beta=1 = reverse KL);
- "gkd": trl.experimental.gkd.GKDTrainer with lmbda=1 (always on-policy), beta=1 (reverse KL); full logits.
Both get the same LoRA (peft LoraConfig), learning rate, seed, fp32 weights and prompts as esr; every rollout is
exactly `tokens` new tokens long (min_new_tokens = max_new_tokens), as benchmarks/step_time.py does for esr.

Timing only wraps TRL's own methods (it changes nothing they compute): generation = the student's `generate` call
(DistillationTrainer._generate_single_turn / GKDTrainer.generate_on_policy_outputs), score = the teacher's forward
(outermost forward hook on the teacher), train = the rest of the optimizer step (student forward/backward, loss,
clipping, AdamW). A step is on_step_begin .. on_step_end of the HF Trainer loop.

The helpers at the top (peak RSS, CPU time, the step clock) and `arm_main` import nothing but the standard
library, so benchmarks/esr_arm.py uses them too.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# --- process measurements (standard library only) ----------------------------------------------------------------

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


# --- the TRL arm ----------------------------------------------------------------------------------------------------

def _teacher_timer(teacher: Any, clock: StepClock) -> None:
    """Time the teacher's outermost forward (the full model for GKD, the backbone for DistillationTrainer)."""
    depth = [0]
    start = [0.0]

    def pre(_module: Any, _args: Any) -> None:
        if depth[0] == 0:
            start[0] = time.perf_counter()
        depth[0] += 1

    def post(_module: Any, _args: Any, _out: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0:
            clock.add("score", time.perf_counter() - start[0])

    modules = [teacher]
    backbone = getattr(teacher, "base_model", None)
    if backbone is not None and backbone is not teacher:
        modules.append(backbone)
    for m in modules:
        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)


class GenerationProbe:
    """Whether the student's `generate` used the KV cache: with it, every decoding forward reads one new token."""

    def __init__(self, backbone: Any) -> None:
        self.active = False
        self.lengths: list[int] = []
        backbone.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, _module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if not self.active:
            return
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if x is not None:
            self.lengths.append(int(x.shape[1]))

    def summary(self) -> dict[str, Any]:
        decode = self.lengths[1:]
        return {"forwards_in_generate": len(self.lengths),
                "kv_cache_used": bool(decode) and max(decode) == 1,
                "decode_input_len_max": max(decode, default=None)}


def _distill_trainer(spec: dict[str, Any], rows: list[dict[str, Any]], common: dict[str, Any], models: tuple,
                     tokenizer: Any, peft_config: Any, probe: GenerationProbe, clock: StepClock) -> Any:
    """trl.DistillationTrainer (beta=1), its generation timed; checks that it tokenises the prompts as esr did."""
    import trl
    from datasets import Dataset

    N = spec["tokens"]

    class Timed(trl.DistillationTrainer):
        def _generate_single_turn(self, prompt_ids, *a, **k):  # the student's `generate` call
            t = time.perf_counter()
            probe.active, probe.lengths = True, []
            out = super()._generate_single_turn(prompt_ids, *a, **k)
            probe.active = False
            clock.add("generate", time.perf_counter() - t)
            clock.tokens += sum(len(c) for c in out)
            return out

    args = trl.DistillationConfig(
        **common, max_completion_length=N, top_p=spec["top_p"], top_k=0, beta=1.0, shuffle_dataset=False,
        generation_kwargs={"min_new_tokens": N},
    )
    dataset = Dataset.from_list([{"prompt": r["messages"]} for r in rows])
    trainer = Timed(model=models[0], teacher_model=models[1], args=args, train_dataset=dataset,
                    processing_class=tokenizer, peft_config=peft_config)
    # The prompt ids TRL generates from must be esr's, token for token.
    got, _, _ = trainer._tokenize_prompts([r["messages"] for r in rows])
    mismatched = sum(list(g) != list(r["ids"]) for g, r in zip(got, rows, strict=True))
    if mismatched:
        raise RuntimeError(f"TRL tokenised {mismatched} of {len(rows)} prompts differently from esr")
    return trainer


def _gkd_trainer(spec: dict[str, Any], rows: list[dict[str, Any]], common: dict[str, Any], models: tuple,
                 tokenizer: Any, peft_config: Any, probe: GenerationProbe, clock: StepClock) -> Any:
    """trl.experimental.gkd.GKDTrainer (lmbda=1, beta=1), its generation timed; checks the collator's prompt ids."""
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    N, W = spec["tokens"], spec["warmup_tokens"]

    class TimedGKD(GKDTrainer):
        def generate_on_policy_outputs(self, model, inputs, generation_config):  # the student's `generate`
            t = time.perf_counter()
            probe.active, probe.lengths = True, []
            ids, mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            probe.active = False
            clock.add("generate", time.perf_counter() - t)
            clock.tokens += int(mask[:, inputs["prompts"].shape[1]:].sum())
            return ids, mask, labels

    # Chat rows ("messages", GKD's format) that also carry their token ids (the collator's pre-tokenised path),
    # so the prompt is esr's ids exactly: prompt ids, then a placeholder completion of N tokens that on-policy
    # sampling (lmbda=1) always replaces. Its length makes the Trainer's token count for the loss normalisation
    # (num_items_in_batch) B x N, as for the real rollouts.
    filler = tokenizer.pad_token_id
    dataset = Dataset.from_list([{"messages": [*r["messages"], {"role": "assistant", "content": ""}],
                                  "input_ids": list(r["ids"]) + [filler] * N,
                                  "completion_mask": [0] * len(r["ids"]) + [1] * N} for r in rows])
    longest = max(len(r["ids"]) for r in rows) + max(N, W)
    args = GKDConfig(**common, max_new_tokens=N, lmbda=1.0, beta=1.0, max_length=longest + 8,
                     train_sampling_strategy="sequential")
    trainer = TimedGKD(model=models[0], teacher_model=models[1], args=args, train_dataset=dataset,
                       processing_class=tokenizer, peft_config=peft_config)
    batch = trainer.data_collator([dataset[i] for i in range(len(rows))])
    got = [p[m.bool()].tolist() for p, m in zip(batch["prompts"], batch["prompt_attention_mask"], strict=True)]
    mismatched = sum(g != list(r["ids"]) for g, r in zip(got, rows, strict=True))
    if mismatched:
        raise RuntimeError(f"GKD's collator gives {mismatched} of {len(rows)} prompts other ids than esr's")
    # GKDTrainer builds its GenerationConfig from fixed fields (no min_new_tokens option): set it here.
    trainer.generation_config.min_new_tokens = N
    trainer.generation_kwargs["min_new_tokens"] = N
    return trainer


TRAINERS = {"distill": _distill_trainer, "gkd": _gkd_trainer}


def _setup(trainer: Any, kind: str, probe: GenerationProbe) -> dict[str, Any]:
    """What the trainer was set up with (trainer class, generation settings, optimizer, loss), for the result."""
    args, gen, model = trainer.args, trainer.generation_config, trainer.model
    gen_info = {k: getattr(gen, k, None) for k in ("do_sample", "temperature", "top_k", "top_p", "min_p",
                                                    "repetition_penalty", "max_new_tokens", "min_new_tokens",
                                                    "use_cache", "eos_token_id", "pad_token_id")}
    return {
        "trainer": type(trainer).__mro__[1].__module__ + "." + type(trainer).__mro__[1].__name__,
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "generation": {**gen_info, **probe.summary()}, "optimizer": type(trainer.optimizer).__name__,
        "optim": str(args.optim), "lr_scheduler": str(args.lr_scheduler_type),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "param_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}),
        "loss": "generalised JSD, beta=1 (reverse KL)" + (
            ", logits divided by temperature in the loss" if kind == "distill" else ", untempered logits"),
        **({"lmbda": args.lmbda} if kind == "gkd" else {}),
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    set_threads(spec["threads"])
    import torch
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    kind = spec["trainer"]
    if kind not in TRAINERS:
        raise ValueError(f"unknown trainer {kind!r}; the trainers are {sorted(TRAINERS)}")
    N, W, B = spec["tokens"], spec["warmup_tokens"], spec["batch"]
    n_warmup, n_timed = spec["warmup_steps"], spec["steps"]
    clock = StepClock(n_warmup)
    notes: list[str] = []

    # Models: the same fp32 safetensors folders esr loads, loaded the way esr loads them (from_pretrained, fp32).
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["student_dir"])
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = AutoModelForCausalLM.from_pretrained(spec["student_dir"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher_dir"], dtype=torch.float32)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_gb()
    probe = GenerationProbe(student.base_model)  # the backbone (peft wraps the model around it, in place)
    lc = spec["lora"]
    peft_config = LoraConfig(r=lc["r"], lora_alpha=lc["alpha"], lora_dropout=lc["dropout"],
                             target_modules="all-linear" if lc["targets"] == "all-linear" else
                             [t.strip() for t in lc["targets"].split(",")], bias="none", task_type="CAUSAL_LM")

    # Data: the prompts of step 0 (warm-up), 1, ..., in order; the trainers read them sequentially.
    steps = spec["prompts"]  # [[{"messages": [...], "ids": [...]}, ... B], ... steps]
    rows = [p for step in steps for p in step]
    assert len(rows) == (n_warmup + n_timed) * B, "spec holds the wrong number of prompts"

    common = dict(
        output_dir=spec["work_dir"], max_steps=n_warmup + n_timed, per_device_train_batch_size=B,
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=spec["weight_decay"], max_grad_norm=spec["max_grad_norm"] or 0.0, seed=spec["seed"],
        bf16=False, fp16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
        gradient_checkpointing=spec["gradient_checkpointing"], temperature=spec["temperature"],
    )
    losses: list[float] = []
    trainer = TRAINERS[kind](spec, rows, common, (student, teacher), tokenizer, peft_config, probe, clock)
    gen = trainer.generation_config

    _teacher_timer(teacher, clock)
    if W != N:  # a shorter warm-up step: generation lengths are restored once it ends
        gen.max_new_tokens = gen.min_new_tokens = W

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.begin()

        def on_step_end(self, args, state, control, **kw):
            clock.end(lr=trainer.lr_scheduler.get_last_lr()[0] if trainer.lr_scheduler else None)
            if state.global_step == n_warmup and W != N:
                gen.max_new_tokens = gen.min_new_tokens = N

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer.add_callback(Clock())
    t0 = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - t0

    expected = B * N
    for row in clock.steps:
        if not row["warmup"] and row["tokens_generated"] != expected:
            notes.append(f"step {row['step']} generated {row['tokens_generated']} tokens, expected {expected}")
    assert "esr" not in sys.modules, "the TRL arm must not import esr"
    return {
        "status": "ok", "steps": clock.steps, "load_s": load_s, "rss_after_load_gb": rss_loaded,
        "rss_before_timed_gb": clock.rss_before_timed_gb, **clock.peaks(),
        "train_wall_s": train_wall, "losses": losses, "notes": notes, "setup": _setup(trainer, kind, probe),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl.__version__,
                     "peft": __import__("peft").__version__, "accelerate": __import__("accelerate").__version__,
                     "threads": torch.get_num_threads()},
    }


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
    Path(sys.argv[2]).write_text(json.dumps(result, indent=2, default=str))
    if result["status"] != "ok":
        sys.exit(1)


if __name__ == "__main__":
    arm_main(run, __doc__)
