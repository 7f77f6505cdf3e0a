"""The exact bytes each token id stands for, so two tokenizations of one text can be compared byte for byte.

Decoding a single token is lossy (a byte-level BPE token holding half of a UTF-8 character decodes to U+FFFD), so
the table is built from the token strings, by the tokenizer's own decoding convention:

- byte-level BPE (GPT-2, Qwen, SmolLM2, Llama-3): every character of the token string stands for one byte through
  GPT-2's printable-byte alphabet (``Ġ`` is the space byte 0x20, ``Ċ`` the newline);
- SentencePiece style (Gemma, Llama-2, Mistral): ``▁`` is a space, ``<0xNN>`` byte-fallback tokens are that byte,
  everything else is its UTF-8;
- anything else: ``decode([id])`` as UTF-8 (exact for tokenizers that never split a character).

Special tokens (BOS, EOS, chat markers) carry no text: their entry is ``b""``. Non-special added tokens are their
literal text.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.lru_cache(maxsize=1)
def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable stand-in character -> byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def decoder_kind(tokenizer: Any) -> str:
    """``byte_level``, ``sentencepiece`` or ``generic``, read from the fast tokenizer's decoder pipeline."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "generic"
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {d.get("type") for d in steps if d}
    if "ByteLevel" in types:
        return "byte_level"
    if "ByteFallback" in types or "Metaspace" in types:
        return "sentencepiece"
    if any(d.get("type") == "Replace" and d.get("content") == " " for d in steps if d):
        return "sentencepiece"
    return "generic"


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (added tokens flagged special, plus bos/eos/pad/unk)."""
    ids = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    ids.update(int(i) for i in tokenizer.all_special_ids)
    return ids


def token_bytes_table(tokenizer: Any, size: int | None = None) -> list[bytes]:
    """``table[id]`` = the bytes token ``id`` writes (``b""`` for special tokens and ids past the tokenizer).

    Args:
        tokenizer: a Hugging Face tokenizer.
        size: table length, e.g. the model's output-layer rows (often padded past ``len(tokenizer)``).
    """
    size = len(tokenizer) if size is None else size
    kind = decoder_kind(tokenizer)
    special = special_token_ids(tokenizer)
    added = {i: tok for i, tok in tokenizer.added_tokens_decoder.items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(size, len(tokenizer)))))
    byte_decoder = _gpt2_byte_decoder()
    table: list[bytes] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            table.append(b"")
        elif i in added:
            table.append(added[i].content.encode("utf-8"))
        elif kind == "byte_level":
            table.append(bytes(byte_decoder[c] for c in piece) if all(c in byte_decoder for c in piece)
                         else piece.encode("utf-8"))
        elif kind == "sentencepiece":
            m = _BYTE_FALLBACK.match(piece)
            table.append(bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8"))
        else:
            table.append(tokenizer.decode([i]).encode("utf-8"))
    table.extend(b"" for _ in range(size - len(table)))
    return table
