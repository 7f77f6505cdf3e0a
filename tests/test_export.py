"""``esr export`` (esr/export): a checkpoint becomes a folder that transformers and vLLM load without esr.

Three real runs on the tiny models (module fixtures, in-process): a LoRA smoke run that evaluates every step (so a
run folder exports its best checkpoint, step 1, not its newest), a full fine-tuning run, and a tiny-qwen run for
vLLM. The CLI runs in one child process (the push to an unreachable hub); the rest calls ``esr.cli.main``.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from esr_process import assert_user_error, run_esr
from safetensors.torch import load_file

from esr.cli import main
from esr.config import load_config
from esr.export import ExportError, export_checkpoint, push_folder
from esr.models import load_model
from esr.models.checkpoints import checkpoint_dir
from esr.train import train

SMOKE = "configs/smoke.yaml"
IDS = [[1, 504, 3237, 314, 253, 1485, 30, 198, 2]]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "lora"
    cfg = load_config(SMOKE, ["train.steps=2", "train.checkpoint_every=1", "eval.every=1", "eval.limit=1",
                              "eval.max_new_tokens=2"])
    train(cfg, run, progress=False)
    return run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "full"
    train(load_config(SMOKE, ["train.steps=1", "train.finetune=full"]), run, progress=False)
    return run


def _card(folder):
    text = (folder / "README.md").read_text()
    front, _, body = text.removeprefix("---\n").partition("\n---\n")
    return front, body


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.float()


def test_a_run_folder_exports_its_best_checkpoint_as_an_adapter_with_tokenizer_and_card(lora_run, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["export", str(lora_run), "--out", str(out)]) == 0
    # Both evaluations score 0 on the random model: best.json keeps the first, so step 1 ships, not the newest.
    assert "step-000001 (best by eval: accuracy=0.0 at step 1)" in capsys.readouterr().out
    ckpt = checkpoint_dir(lora_run, 1)
    assert sorted(load_file(out / "adapter_model.safetensors")) == sorted(load_file(ckpt / "adapter_model.safetensors"))
    for name, tensor in load_file(ckpt / "adapter_model.safetensors").items():
        assert torch.equal(load_file(out / "adapter_model.safetensors")[name], tensor), name
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == json.loads((ckpt / "adapter_config.json").read_text())[
        "base_model_name_or_path"]
    assert (out / "chat_template.jinja").read_text().strip() and (out / "tokenizer.json").is_file()
    run_eos = json.loads((lora_run / "run.json").read_text())["eos_token_ids"]
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert (eos if isinstance(eos, list) else [eos]) == run_eos
    front, body = _card(out)
    assert "library_name: peft" in front and "- on-policy-distillation" in front and "base_model:" not in front
    for fact in ("tiny-student distilled from tiny-teacher", "| horizon | esr (N = 16 tokens) |", "| loss | reverse_kl",
                 "| steps | 1 of 2 (checkpoint best by eval: accuracy=0.0 at step 1) |", "| lr | 0.001 |",
                 "| data | gsm_symbolic |", "esr version | 0.1.0", "## Evaluation during training (gsm_symbolic",
                 "| step | accuracy | pass@1 |", "exists only on the machine that trained"):
        assert fact in body, fact
    metrics = body.split("## Final training metrics")[1].split("##")[0]
    assert "| 1 |" in metrics and "| 2 |" not in metrics  # rows up to the exported step only


def test_exports_load_without_esr_and_give_esr_logits(lora_run, tmp_path):
    ckpt = checkpoint_dir(lora_run, 2)
    fp32, bf16, adapter = tmp_path / "fp32", tmp_path / "bf16", tmp_path / "adapter"
    assert main(["export", str(ckpt), "--out", str(fp32), "--merge"]) == 0
    assert main(["export", str(ckpt), "--out", str(adapter)]) == 0
    assert main(["export", str(ckpt), "--out", str(bf16), "--merge", "--dtype", "bfloat16"]) == 0
    assert not list(fp32.glob("adapter_*")) and (fp32 / "model.safetensors").is_file()
    assert {t.dtype for t in load_file(bf16 / "model.safetensors").values()} == {torch.bfloat16}
    assert "library_name: transformers" in _card(fp32)[0] and "LoRA merged into the student" in _card(fp32)[1]
    code = ("import sys, json; sys.modules['esr'] = None\n"  # esr cannot be imported in this process
            "import os, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "from peft import AutoPeftModelForCausalLM\n"
            "out = {}\n"
            "for d in sys.argv[2:]:\n"
            "    peft = os.path.exists(os.path.join(d, 'adapter_config.json'))\n"
            "    m = (AutoPeftModelForCausalLM if peft else AutoModelForCausalLM).from_pretrained(d)\n"
            "    AutoTokenizer.from_pretrained(d)\n"
            "    with torch.no_grad(): out[d] = m(input_ids=torch.tensor(json.loads(sys.argv[1]))).logits.float()"
            ".tolist()\n"
            "print(json.dumps(out))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(IDS), str(fp32), str(bf16), str(adapter)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {k: torch.tensor(v) for k, v in json.loads(proc.stdout.splitlines()[-1]).items()}
    own = _logits(load_model(str(ckpt))[0])  # esr's own model: base + adapter, unmerged
    torch.testing.assert_close(got[str(fp32)], own, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[str(adapter)], own, atol=1e-5, rtol=1e-5)  # peft, on the base the adapter names
    assert (got[str(bf16)] - own).abs().max() < 0.05 * own.abs().max()
    assert (own - _logits(load_model("tiny-student")[0])).abs().max() > 1e-3  # the adapter changed the model


def test_a_full_fine_tuning_checkpoint_exports_its_weights(full_run, tmp_path):
    out = tmp_path / "full"
    ckpt = checkpoint_dir(full_run, 1)
    done = export_checkpoint(full_run, out)
    assert done.merged and not done.source.lora and done.source.checkpoint == ckpt
    saved, ours = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    assert saved.keys() == ours.keys() and all(torch.equal(saved[k], ours[k]) for k in saved)
    front, body = _card(out)
    assert "library_name: transformers" in front and "| fine-tuning | full |" in body
    assert "newest; the run did not evaluate" in done.source.why and "Evaluation during training" not in body


def test_refusals_are_one_line_and_write_nothing(lora_run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep me")
    assert main(["export", str(lora_run), "--out", str(taken)]) == 2
    assert "is not empty" in capsys.readouterr().err and (taken / "x").read_text() == "keep me"
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "a")]) == 2
    assert "is not an esr checkpoint" in capsys.readouterr().err
    damaged = tmp_path / "run" / "checkpoints" / "step-000002"
    shutil.copytree(checkpoint_dir(lora_run, 2), damaged)
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # cut short, as a full disk leaves it
    assert main(["export", str(damaged), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("esr: error: checkpoint") and "is damaged" in err and "adapter_model" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_push_without_token_or_hub_fails_in_one_line_and_keeps_the_folder(lora_run, tmp_path, monkeypatch):
    out = tmp_path / "model"
    # The CLI path in a child process: export, then a real push against a hub that cannot be reached.
    proc = run_esr("export", lora_run, "--out", out, "--merge", "--push-to-hub", "someone/esr-smoke", "--private",
                   env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "HF_TOKEN": "hf_notreal",
                        "HF_ENDPOINT": "http://127.0.0.1:9"}, timeout=300)
    message = assert_user_error(proc, "someone/esr-smoke", "http://127.0.0.1:9", "is complete",
                                f"hf upload someone/esr-smoke {out}")
    assert "exported" in proc.stdout and "ConnectError" in message
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "README.md", "tokenizer.json",
                                                "generation_config.json", "chat_template.jinja"}
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ExportError, match=r"no Hugging Face token to push someone/esr-smoke: set HF_TOKEN"):
        push_folder(out, "someone/esr-smoke")


def test_an_exported_tiny_qwen_serves_in_vllm_with_hf_greedy_tokens(tmp_path):
    pytest.importorskip("vllm", reason="the vllm extra is not installed: pip install 'esr-distill[vllm]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from esr.rollout.vllm_env import import_vllm, vllm_kwargs

    run, out = tmp_path / "qwen", tmp_path / "qwen-model"
    train(load_config(SMOKE, ["train.steps=1", "student.name=tiny-qwen", "teacher.name=tiny-qwen"]), run,
          progress=False)
    export_checkpoint(run, out, merge=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    model = AutoModelForCausalLM.from_pretrained(out)
    hf = model.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, len(ids):]
    vllm = import_vllm(1)
    kwargs = vllm_kwargs(dtype=torch.float32, max_model_len=256, seed=0, kv_cache_gib=1)
    llm = vllm.LLM(model=str(out), enforce_eager=not torch.cuda.is_available(), **kwargs)  # CPU: starts in seconds
    try:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        served = llm.generate([vllm.TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0].outputs[0]
    finally:
        del llm
    assert list(served.token_ids) == hf.tolist()
