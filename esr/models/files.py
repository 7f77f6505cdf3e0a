"""Whether the files of a model folder are whole, checked without loading any weights: JSON files parse, and each
safetensors file has a readable header whose tensors exactly cover the file (a file cut short by a crash or a full
disk is caught by its size). No torch: ``esr check``, ``esr eval`` and ``esr generate`` use it before loading.

safetensors keeps no checksum, so a changed byte inside a tensor's data cannot be seen; everything else that makes a
file unloadable can.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from esr.errors import EsrError
from esr.models.checkpoints import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MODEL_WEIGHTS,
    MODEL_WEIGHTS_INDEX,
)

_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the header's size


class DamagedFileError(EsrError, ValueError):
    """A file a model folder needs is missing, cut short or unreadable; ``path`` and ``what`` say which and why."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = Path(path), what
        super().__init__(f"{path} {what}")


def read_json(path: Path) -> Any:
    """The parsed JSON file; ``DamagedFileError`` when it is missing or not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise DamagedFileError(path, "is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFileError(path, f"is not valid JSON ({_json_reason(e)})") from None


def _json_reason(e: ValueError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at line {e.lineno} column {e.colno}"
    return str(e).split(":")[0]


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the header of a safetensors file, after checking that the header parses and
    that its tensors' byte ranges fit their dtypes and shapes and cover the file exactly. ``DamagedFileError``
    otherwise (a missing file, a truncated one, one that is not safetensors)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise DamagedFileError(path, f"is not a safetensors file, or is cut short ({size} bytes; no "
                                             "readable header)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise DamagedFileError(path, "is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DamagedFileError(path, "is not a safetensors file (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise DamagedFileError(path, "is not a safetensors file (its header is not a JSON object)")
    shapes: dict[str, tuple[int, ...]] = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            width = _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise DamagedFileError(path, f"has a damaged header (tensor {name!r})") from None
        if stop - begin != math.prod(shape) * width:
            raise DamagedFileError(path, f"has a damaged header (tensor {name!r}: {stop - begin} bytes for shape "
                                         f"{list(shape)} {info['dtype']})")
        shapes[name] = shape
        end = max(end, stop)
    expected = 8 + n + end
    if size < expected:
        raise DamagedFileError(path, f"is truncated: {size} of {expected} bytes (cut short by a crash or a full disk)")
    if size > expected:
        raise DamagedFileError(path, f"has {size - expected} bytes more than its header describes")
    return shapes


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight a model folder holds: its LoRA adapter (``adapter_config.json`` parses too),
    or its model weights (``model.safetensors``, or the shards its index lists; ``config.json`` parses too).
    ``DamagedFileError`` naming the first file that is missing or damaged."""
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).exists() or (folder / ADAPTER_WEIGHTS).exists():
        config = read_json(folder / ADAPTER_CONFIG)
        if not isinstance(config, dict):
            raise DamagedFileError(folder / ADAPTER_CONFIG, "is not a JSON object")
        return safetensors_shapes(folder / ADAPTER_WEIGHTS)
    read_json(folder / "config.json")
    index = folder / MODEL_WEIGHTS_INDEX
    if index.exists():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise DamagedFileError(index, "has no weight_map")
        files = sorted(set(weight_map.values()))
    else:
        files = [MODEL_WEIGHTS]
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        shapes.update(safetensors_shapes(folder / name))
    return shapes


def check_model_folder(folder: Path) -> None:
    """Raise ``DamagedFileError`` when a folder of esr's (a checkpoint: ``adapter_config.json`` or ``config.json``
    beside safetensors weights) has a missing or damaged file, before transformers or peft meet it."""
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).exists() or (folder / ADAPTER_WEIGHTS).exists():
        pickled_only = not (folder / ADAPTER_WEIGHTS).exists() and (folder / "adapter_model.bin").exists()
        if not pickled_only:  # a pickle adapter is refused or allowed by esr.models.load, not here
            weight_shapes(folder)
        else:
            read_json(folder / ADAPTER_CONFIG)
    elif any(p.suffix == ".safetensors" for p in folder.iterdir()):
        weight_shapes(folder)
