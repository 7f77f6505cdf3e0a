"""A tokenizer's id space as one digest, so that a trainer can check a teacher server's vocabulary against its student's
without shipping either vocabulary over the wire.

    vocab_digest(tokenizer, n) = sha256(json([token of id 0, token of id 1, ..., token of id n - 1]))

(``null`` for an id no token has). Two tokenizers share an id space on ids < n exactly when their digests of n agree
(up to sha256 collisions). Same-tokenizer distillation allows one vocabulary to extend the other (Qwen3 adds tokens
after Qwen2.5's ids; ``esr.models.pair.vocabulary_mismatch``), so the trainer compares digests of the SMALLER
tokenizer's size: the server publishes its full digest in ``GET /health`` (``tokenizer_sha256``) and the digest of
its first N ids on ``GET /health?vocab_prefix=N`` (``vocab_prefix_sha256``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def vocab_digest(tokenizer: Any, n: int | None = None) -> str:
    """Hex sha256 of the tokens of ids 0 .. n - 1 in id order (``n`` defaults to ``len(tokenizer)``)."""
    size = len(tokenizer) if n is None else int(n)
    tokens: list[str | None] = [None] * size
    for token, i in tokenizer.get_vocab().items():
        if 0 <= i < size:
            tokens[i] = token
    text = json.dumps(tokens, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
