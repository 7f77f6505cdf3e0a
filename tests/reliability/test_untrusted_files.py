"""Files esr reads but did not write: pickle weights, hub code, YAML configs, a checkpoint's trainer_state.pt. None of
them may make esr run code unless the user asked for it by name; every refusal says why and what to do instead."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from esr.cli import main
from esr.config import Config, load_config
from esr.models import apply_lora, load_model, save_lora
from esr.models import load as load_module
from esr.models.synthetic import build_tiny
from esr.train import train
from esr.train.session import build_session

SMOKE = "configs/smoke.yaml"

pytestmark = pytest.mark.usefixtures("needs_smollm2_package")


def _pickle_folder(folder: Path) -> tuple[torch.nn.Module, Path]:
    """tiny-student saved the legacy way: config, tokenizer and a pickled `pytorch_model.bin`, no safetensors
    (transformers 5 writes only safetensors, so the pickle is written with torch.save as older versions did)."""
    model, tokenizer = build_tiny("tiny-student")
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return model, folder


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 504, 2365, 3128]])).logits


def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI on a user error: exit code 2 and one message on stderr, never a traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("esr: error: "), err
    return err


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): proof, if the marker appears, that a file's code was run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_pickle_weights_are_refused_with_the_reason_and_the_fix(tmp_path, capsys):
    _, folder = _pickle_folder(tmp_path / "legacy")
    err = _cli_error(capsys, ["train", SMOKE, f"student.name={folder}", "--out", str(tmp_path / "run")])
    assert f"'{folder}' has only pickle weights (pytorch_model.bin)" in err
    assert "unpickling a file can run code hidden in it" in err
    assert "save_pretrained(new_folder) writes safetensors" in err and "set student.allow_pickle=true" in err
    # A PEFT adapter saved as adapter_model.bin (peft would unpickle it by itself) is refused the same way.
    adapter = tmp_path / "adapter"
    save_lora(apply_lora(build_tiny("tiny-student")[0], r=4, alpha=8, dropout=0.0, targets="q_proj"), adapter)
    torch.save({}, adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(load_module.ModelSpecError, match=r"only pickle weights \(adapter_model.bin\)"):
        load_model(str(adapter))


def test_pickle_weights_load_only_when_allowed_with_a_warning(tmp_path, caplog):
    model, folder = _pickle_folder(tmp_path / "legacy")
    with caplog.at_level(logging.WARNING, logger="esr.models"):
        loaded, _ = load_model(str(folder), allow_pickle=True)
    assert torch.equal(_logits(loaded), _logits(model))
    assert f"loading pickle weights (pytorch_model.bin) from {folder} because allow_pickle is on" in caplog.text
    # The config key reaches load_model: the same folder trains as a student once student.allow_pickle=true.
    cfg = load_config(SMOKE, [f"student.name={folder}", "student.allow_pickle=true"])
    assert Config().student.allow_pickle is False and Config().teacher.allow_pickle is False
    assert torch.equal(_logits(build_session(cfg).student), _logits(model))  # LoRA's B starts at zero: same logits


def test_trust_remote_code_is_off_unless_asked(tmp_path, monkeypatch):
    """Every transformers call load_model makes (hub id and local folder) gets trust_remote_code=False by default."""
    seen: list[tuple[str, object]] = []
    model, tokenizer = build_tiny("tiny-student")
    model.save_pretrained(tmp_path / "folder")
    tokenizer.save_pretrained(tmp_path / "folder")

    def spy(cls: type, name: str) -> None:
        real = cls.from_pretrained

        def from_pretrained(spec: object, *args: object, **kwargs: object) -> object:
            seen.append((name, kwargs.get("trust_remote_code", "not passed")))
            if str(spec).startswith("someone/"):  # a hub id: answer from the tiny model instead of the network
                return {"config": model.config, "model": model, "tokenizer": tokenizer}[name]
            return real(spec, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)

    spy(load_module.AutoConfig, "config")
    spy(load_module.AutoModelForCausalLM, "model")
    spy(load_module.AutoTokenizer, "tokenizer")
    for spec in ("someone/tiny", str(tmp_path / "folder")):
        seen.clear()
        load_model(spec)
        assert {name for name, _ in seen} >= {"model", "tokenizer"}
        assert all(value is False for _, value in seen), seen
        seen.clear()
        load_model(spec, trust_remote_code=True)
        assert seen and all(value is True for _, value in seen), seen
    assert Config().student.trust_remote_code is False and Config().teacher.trust_remote_code is False


def test_yaml_python_tags_are_refused_in_files_and_overrides(tmp_path, capsys):
    marker = tmp_path / "pwned"
    tag = f"!!python/object/apply:os.mkdir ['{marker}']"
    config = tmp_path / "evil.yaml"
    config.write_text(f"name: {tag}\n")
    err = _cli_error(capsys, ["train", str(config)])
    assert f"{config} is not valid YAML for esr: could not determine a constructor for the tag" in err
    assert "at line 1, column 7" in err and "!!python/... are refused because loading them would run code" in err
    err = _cli_error(capsys, ["train", SMOKE, f"name={tag}", "--out", str(tmp_path / "run")])
    assert f"override 'name={tag}' is not valid YAML for esr" in err
    err = _cli_error(capsys, ["train", SMOKE, "train.steps=[", "--out", str(tmp_path / "run")])  # plain bad YAML
    assert "override 'train.steps=[' is not valid YAML: while parsing a flow node, expected the node content" in err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_trainer_state_with_a_pickled_object_is_refused_not_run(tmp_path, capsys):
    run = train(load_config(SMOKE, ["train.steps=1"]), tmp_path / "run", progress=False)
    marker = tmp_path / "pwned"
    state = run.last_checkpoint / "trainer" / "trainer_state.pt"
    torch.save({"optimizer": _RunsCode(marker), "scheduler": {}, "rng_cpu": torch.get_rng_state(), "rng_cuda": []},
               state)
    err = _cli_error(capsys, ["train", "--resume", str(tmp_path / "run"), "--no-progress"])
    assert f"{state} was refused: it holds more than tensors and plain data" in err
    assert "unsupported GLOBAL posix.mkdir" in err and "start a new run" in err and "weights_only=False" not in err
    assert not marker.exists()


def test_cli_generate_needs_allow_pickle_for_pickle_weights(tmp_path, capsys):
    _, folder = _pickle_folder(tmp_path / "legacy")
    err = _cli_error(capsys, ["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2"])
    assert "--allow-pickle" in err
    args = ["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2", "--allow-pickle"]
    assert main(args) == 0
    assert "### hi" in capsys.readouterr().out
