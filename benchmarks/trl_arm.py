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

What it measures with (peak RSS, CPU time, the step clock, `arm_main`) is benchmarks/measure.py, standard library
only, shared with benchmarks/esr_arm.py.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any

if __package__:
    from benchmarks.measure import StepClock, arm_main, rss_gb, set_threads
else:  # run as a script (in the TRL environment, without esr): this folder is sys.path[0]
    from measure import StepClock, arm_main, rss_gb, set_threads


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

    vllm = {}
    if spec.get("use_vllm"):  # TRL's own colocated vLLM; the CPU settings esr's engine uses (esr/rollout/vllm_env.py)
        for key, value in (("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("VLLM_CPU_KVCACHE_SPACE", "1"),
                           ("VLLM_CPU_OMP_THREADS_BIND", f"0-{spec['threads'] - 1}")):
            os.environ.setdefault(key, value)
        vllm = {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 1024}
    args = trl.DistillationConfig(
        **common, max_completion_length=N, top_p=spec["top_p"], top_k=0, beta=1.0, shuffle_dataset=False,
        generation_kwargs={"min_tokens": N} if vllm else {"min_new_tokens": N}, **vllm,
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

    kind = spec["trainer"]
    if kind not in TRAINERS:
        raise ValueError(f"unknown trainer {kind!r}; the trainers are {sorted(TRAINERS)}")
    N, W, B = spec["tokens"], spec["warmup_tokens"], spec["batch"]
    n_warmup, n_timed = spec["warmup_steps"], spec["steps"]
    clock = StepClock(n_warmup)
    notes: list[str] = []

    t0 = time.perf_counter()
    student, teacher, tokenizer = _load_models(spec)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_gb()
    probe = GenerationProbe(student.base_model)  # the backbone (peft wraps the model around it, in place)

    # Data: the prompts of step 0 (warm-up), 1, ..., in order; the trainers read them sequentially.
    steps = spec["prompts"]  # [[{"messages": [...], "ids": [...]}, ... B], ... steps]
    rows = [p for step in steps for p in step]
    assert len(rows) == (n_warmup + n_timed) * B, "spec holds the wrong number of prompts"

    losses: list[float] = []
    trainer = TRAINERS[kind](spec, rows, _trainer_args(spec), (student, teacher), tokenizer, _lora_config(spec),
                             probe, clock)
    _teacher_timer(teacher, clock)
    if W != N:  # a shorter warm-up step: generation lengths are restored once it ends
        trainer.generation_config.max_new_tokens = trainer.generation_config.min_new_tokens = W
    trainer.add_callback(_clock_callback(trainer, clock, losses, n_warmup, (W, N)))
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


def _load_models(spec: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(student, teacher, tokenizer): the same fp32 safetensors folders esr loads, loaded the way esr loads them
    (from_pretrained, fp32), the tokenizer padding on the left."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["student_dir"])
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = AutoModelForCausalLM.from_pretrained(spec["student_dir"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher_dir"], dtype=torch.float32)
    return student, teacher, tokenizer


def _lora_config(spec: dict[str, Any]) -> Any:
    """esr's LoRA settings (r, alpha, dropout, targets) as peft's LoraConfig."""
    from peft import LoraConfig

    lc = spec["lora"]
    return LoraConfig(r=lc["r"], lora_alpha=lc["alpha"], lora_dropout=lc["dropout"],
                      target_modules="all-linear" if lc["targets"] == "all-linear" else
                      [t.strip() for t in lc["targets"].split(",")], bias="none", task_type="CAUSAL_LM")


def _trainer_args(spec: dict[str, Any]) -> dict[str, Any]:
    """The training arguments both trainers share: esr's learning rate, schedule, seed and clipping, on CPU, fp32."""
    return dict(
        output_dir=spec["work_dir"], max_steps=spec["warmup_steps"] + spec["steps"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=spec["weight_decay"], max_grad_norm=spec["max_grad_norm"] or 0.0, seed=spec["seed"],
        bf16=False, fp16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
        gradient_checkpointing=spec["gradient_checkpointing"], temperature=spec["temperature"],
    )


def _clock_callback(trainer: Any, clock: StepClock, losses: list[float], n_warmup: int,
                    tokens: tuple[int, int]) -> Any:
    """A TrainerCallback that starts and ends the clock's steps, restores the generation length after a shorter
    warm-up step (``tokens``: new tokens of the warm-up and of the timed steps), and collects the logged losses."""
    from transformers import TrainerCallback

    gen, (W, N) = trainer.generation_config, tokens

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

    return Clock()


if __name__ == "__main__":
    arm_main(run, __doc__)
