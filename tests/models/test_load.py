"""load_model / load_tokenizer on every kind of spec, and LoRA wrap -> save -> reload; offline, tiny models only."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from esr.models import (
    ModelSpecError,
    apply_lora,
    count_parameters,
    load_model,
    load_tokenizer,
    save_lora,
    trainable_parameters,
    zoo,
)
from esr.models import load as load_module

pytestmark = pytest.mark.usefixtures("needs_smollm2_package")


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_tiny_presets_are_deterministic_and_leave_global_rng_alone() -> None:
    rng_before = torch.random.get_rng_state()
    first, _ = load_model("tiny-student")
    second, _ = load_model("tiny-student")
    teacher, _ = load_model("tiny-teacher")
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert (first.config.hidden_size, teacher.config.hidden_size) == (64, 96)
    assert first.config.num_hidden_layers == teacher.config.num_hidden_layers == 2
    assert count_parameters(first) == (zoo.TINY["tiny-student"].params,) * 2
    assert count_parameters(teacher)[1] == zoo.TINY["tiny-teacher"].params


def test_tiny_preset_has_the_real_smollm2_tokenizer_ready_for_generation() -> None:
    model, tok = load_model("tiny-student")
    assert len(tok) == 49152 and model.config.vocab_size == 49152
    assert model.config.tie_word_embeddings
    assert (tok.eos_token, tok.eos_token_id, model.config.eos_token_id) == ("<|im_end|>", 2, 2)
    assert tok.pad_token_id == model.config.pad_token_id == model.generation_config.pad_token_id == 2
    assert tok.padding_side == "left"
    assert not model.training
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert load_tokenizer("tiny-teacher").get_vocab() == tok.get_vocab()


def test_random_spec_has_the_presets_architecture_and_tokenizer() -> None:
    model, tok = load_model("random:smollm2-135m-instruct")
    arch = zoo.PRESETS["smollm2-135m-instruct"].architecture
    assert model.config.model_type == arch["model_type"] == "llama"
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(model.config, key) == arch[key], key
    assert count_parameters(model)[1] == zoo.PRESETS["smollm2-135m-instruct"].params
    assert len(tok) == 49152 and tok.chat_template is not None


def test_random_spec_of_unknown_preset_is_refused() -> None:
    with pytest.raises(ModelSpecError, match="Did you mean 'qwen2.5-coder-0.5b-instruct'"):
        load_model("random:qwen2.5-coder-0.5b")


def test_mistyped_preset_fails_fast_naming_the_closest() -> None:
    with pytest.raises(ModelSpecError) as err:
        load_model("smollm2-135m-instruc")
    assert "Did you mean 'smollm2-135m-instruct'?" in str(err.value)
    assert "tiny-student" in str(err.value)  # the full preset list


def test_hub_failure_says_what_the_spec_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(load_module.AutoConfig, "from_pretrained", offline)
    with pytest.raises(ModelSpecError) as err:
        load_model("someone/qwen2.5-coder-0.5b-instruct")
    message = str(err.value)
    assert "not a zoo preset" in message and "nor an existing folder" in message
    assert "could not be fetched from the hub (We couldn't connect" in message
    assert "Did you mean 'qwen2.5-coder-0.5b-instruct'?" in message


def test_folder_with_only_pickle_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ModelSpecError, match=r"only pickle weights \(pytorch_model.bin\); esr loads safetensors"):
        load_model(str(tmp_path))


def test_saved_folder_reloads_with_identical_logits(tmp_path: Path) -> None:
    model, tok = load_model("tiny-student")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok_again = load_model(str(tmp_path))
    ids = tok("The cat sat")["input_ids"]
    assert torch.equal(_logits(model, ids), _logits(again, ids))
    assert tok_again.padding_side == "left"


def test_adapter_folder_reloads_onto_its_base(tmp_path: Path) -> None:
    base, tok = load_model("tiny-student")
    ids = tok("The cat sat")["input_ids"]
    base_logits = _logits(base, ids)
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, targets="q_proj,v_proj")
    with torch.no_grad():  # LoRA B starts at zero (a no-op); give it weights so the adapter changes the output
        for _name, param in trainable_parameters(model):
            param.copy_(torch.linspace(-0.5, 0.5, param.numel()).reshape(param.shape))
    trained_logits = _logits(model, ids)
    assert not torch.allclose(trained_logits, base_logits)
    save_lora(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-student"

    loaded, loaded_tok = load_model(str(tmp_path))
    assert isinstance(loaded, PeftModel) and not loaded.training
    torch.testing.assert_close(_logits(loaded, ids), trained_logits)
    assert loaded_tok.get_vocab() == load_tokenizer(str(tmp_path)).get_vocab() == tok.get_vocab()


def test_lora_trains_only_the_adapters() -> None:
    model, _ = load_model("tiny-student")
    total_before = count_parameters(model)[1]
    wrapped = apply_lora(model, r=2, alpha=4, dropout=0.0, targets="all-linear")
    names = [name for name, _ in trainable_parameters(wrapped)]
    assert names and all("lora_" in name for name in names)
    # all-linear: q, k, v, o, gate, up, down in each of 2 layers, A and B each; never the (tied) output head
    assert len(names) == 2 * 7 * 2 and not any("lm_head" in name for name in names)
    trainable, total = count_parameters(wrapped)
    assert trainable == sum(p.numel() for _, p in trainable_parameters(wrapped))
    assert total == total_before + trainable


def test_wrapping_and_loading_lora_raise_no_deprecation_warning_from_inside_peft(tmp_path: Path) -> None:
    """peft 0.21 reads ``is_gradient_checkpointing``, which transformers 5 deprecates: a warning users cannot act on."""
    model, _ = load_model("tiny-student")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_lora(apply_lora(model, r=2, alpha=4, dropout=0.0, targets="all-linear"), tmp_path)
        load_model(str(tmp_path))
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_lora_with_unknown_target_lists_the_linear_layers() -> None:
    model, _ = load_model("tiny-student")
    with pytest.raises(ValueError, match="its linear layers are named: .*q_proj"):
        apply_lora(model, r=2, alpha=4, dropout=0.0, targets="query,value")
