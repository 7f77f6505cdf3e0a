"""A checkpoint is a plain Hugging Face folder: weights (or adapter) at the top, trainer state in ``trainer/``, an
adapter naming a base ``from_pretrained`` finds. Plain peft and transformers load it without esr; checkpoints
written before ``trainer/`` existed still resume, to the same weights as an uninterrupted run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from esr.config import load_config
from esr.models import load_model, zoo
from esr.models.checkpoints import is_old_layout, latest_checkpoint, model_weight_files, trainer_files
from esr.train import resume, train

SMOKE = "configs/smoke.yaml"
VOLATILE = {"seconds_align", "seconds_generate", "seconds_score", "seconds_train", "seconds_extrapolate",
            "peak_mem_gb"}
TRAINER_FILES = {"trainer_state.pt", "trainer_state.json"}


@pytest.fixture(autouse=True)
def _tokenizer(needs_smollm2_package):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-step tiny runs, LoRA and full, with EffOPD on (so an extrapolator state is written too)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for finetune in ("lora", "full"):
        cfg = load_config(SMOKE, ["train.steps=1", f"train.finetune={finetune}", "optim.extrapolate.enabled=true"])
        out[finetune] = train(cfg, root / finetune, progress=False).last_checkpoint
    return out


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_lora_step_folder_holds_the_adapter_on_top_and_trainer_state_below(runs):
    folder = runs["lora"]
    files = _tree(folder)
    assert {"adapter_config.json", "adapter_model.safetensors", "config.yaml"} <= files
    assert {f"trainer/{name}" for name in (*TRAINER_FILES, "extrapolator.safetensors")} <= files
    top = {name for name in files if "/" not in name}
    assert not top & (TRAINER_FILES | {"extrapolator.safetensors"})  # push_to_hub of the folder uploads no optimizer
    assert trainer_files(folder) == folder / "trainer" and not is_old_layout(folder)
    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(zoo.cache_root() / "models" / "tiny-student")  # a folder, not the preset name
    assert (Path(base) / "config.json").is_file() and (Path(base) / "model.safetensors").is_file()


def test_full_step_folder_holds_model_and_tokenizer_on_top(runs):
    folder = runs["full"]
    files = _tree(folder)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.yaml"} <= files
    top = {name for name in files if "/" not in name}
    assert [p.name for p in model_weight_files(folder)] == ["model.safetensors"]
    assert [name for name in top if name.endswith(".safetensors")] == ["model.safetensors"]
    assert {f"trainer/{name}" for name in (*TRAINER_FILES, "extrapolator.safetensors")} <= files


_PLAIN_LOAD = """
import sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
ckpt, kind, out = sys.argv[1:4]
if kind == "lora":
    import json
    from peft import AutoPeftModelForCausalLM
    model = AutoPeftModelForCausalLM.from_pretrained(ckpt)
    base = json.load(open(ckpt + "/adapter_config.json"))["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(base)
else:
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
ids = torch.tensor([tokenizer("Natalia sold clips to 48 of her friends")["input_ids"]])
with torch.no_grad():
    save_file({"ids": ids, "logits": model(ids).logits.float().contiguous()}, out)
assert not [m for m in sys.modules if m == "esr" or m.startswith("esr.")], "esr was imported"
"""


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_plain_peft_and_transformers_load_a_checkpoint_without_esr(runs, tmp_path, kind):
    out = tmp_path / "plain.safetensors"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # esr is not even importable there
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, str(runs[kind]), kind, str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    plain = load_file(out)
    model, tokenizer = load_model(str(runs[kind]))
    assert tokenizer("Natalia sold clips to 48 of her friends")["input_ids"] == plain["ids"][0].tolist()
    with torch.no_grad():
        logits = model(plain["ids"]).logits.float()
    torch.testing.assert_close(logits, plain["logits"])


def _as_old_layout(step_dir: Path) -> None:
    """Turn a checkpoint into what esr wrote before ``trainer/`` existed: the trainer files beside the weights, and
    an adapter naming its base by the esr preset name."""
    for f in (step_dir / "trainer").iterdir():
        f.rename(step_dir / f.name)
    (step_dir / "trainer").rmdir()
    adapter_config = step_dir / "adapter_config.json"
    if adapter_config.is_file():
        config = json.loads(adapter_config.read_text())
        adapter_config.write_text(json.dumps({**config, "base_model_name_or_path": "tiny-student"}, indent=2))


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_an_old_layout_checkpoint_resumes_like_an_uninterrupted_run(tmp_path, finetune):
    overrides = ["optim.extrapolate.enabled=true", "optim.extrapolate.carry_alpha=true", "train.steps=4",
                 "train.checkpoint_every=2", f"train.finetune={finetune}", "train.lr=3e-4"]
    whole = train(load_config(SMOKE, overrides), tmp_path / "whole", progress=False)
    # The same run stopped after its step-2 checkpoint, which was written in the old layout.
    shutil.copytree(tmp_path / "whole", tmp_path / "old")
    shutil.rmtree(tmp_path / "old" / "checkpoints" / "step-000004")
    step2 = latest_checkpoint(tmp_path / "old")
    _as_old_layout(step2)
    assert is_old_layout(step2) and trainer_files(step2) == step2
    assert (step2 / "extrapolator.safetensors").is_file()  # beside the weights, as before

    resumed = resume(tmp_path / "old", progress=False)
    assert [r["step"] for r in resumed.metrics] == [1, 2, 3, 4]
    assert _stable(resumed.metrics) == _stable(whole.metrics)
    name = "adapter_model.safetensors" if finetune == "lora" else "model.safetensors"
    for file in (name, "trainer/extrapolator.safetensors"):
        a, b = load_file(whole.last_checkpoint / file), load_file(resumed.last_checkpoint / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (file, finetune)


@pytest.mark.parametrize("base", ["tiny-student", "/another/machine/.cache/esr/models/tiny-student"])
def test_an_adapter_naming_its_preset_or_a_missing_zoo_folder_loads_as_that_preset(runs, tmp_path, base):
    old = tmp_path / "step-000001"
    shutil.copytree(runs["lora"], old)
    _as_old_layout(old)
    config = json.loads((old / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        new_logits = load_model(str(runs["lora"]))[0](ids).logits
        old_logits = load_model(str(old))[0](ids).logits
    torch.testing.assert_close(old_logits, new_logits)
