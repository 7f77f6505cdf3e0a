"""One entry point from a model spec string to a (model, tokenizer) pair ready for generation.

A spec is resolved in this order:
1. a zoo preset (`esr models` lists them): converted once, then loaded from the fp32 cache; tiny presets are built;
2. `random:<preset>`: the preset's architecture with random weights;
3. an existing local folder: an HF model folder (safetensors only), or a PEFT adapter folder (adapter_config.json),
   whose base model is loaded through this same function and the adapter attached (a base that is a zoo preset's
   cache folder, present or not, loads as that preset); its files are checked first (``esr.models.files``), so a
   truncated or unreadable one is named in a ``DamagedFileError``;
4. anything else is passed to `from_pretrained` as a hub id (safetensors only).

Pickle weights (`pytorch_model.bin`, `.pt`, `.pth`, `.ckpt`, a PEFT `adapter_model.bin`) are refused unless the
caller passes `allow_pickle=True` (config: `student.allow_pickle`): unpickling a file can run code hidden in it. Even
then they go through torch's restricted unpickler (`weights_only=True`), with a warning.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from esr.errors import EsrError
from esr.models import synthetic, zoo
from esr.models.files import check_model_folder, read_json
from esr.models.lora import quiet_peft

CausalLM = PreTrainedModel | PeftModel
"""What `load_model` returns: a transformers model, or a PeftModel when the spec is an adapter folder."""

log = logging.getLogger("esr.models")

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_T = TypeVar("_T")


class ModelSpecError(EsrError, ValueError):
    """A model spec names nothing loadable; the message says what was tried and the closest preset."""


def load_model(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> tuple[CausalLM, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer from a preset name, `random:<preset>`, a local folder or a hub id.

    The model comes back in eval mode on `device`; the tokenizer has a pad token (eos when it had none) and pads on
    the left, which batched generation needs. `trust_remote_code` is passed to transformers and is off by default;
    `allow_pickle` lets a folder or hub id without safetensors load its pickle weights (off by default).
    """
    model, tokenizer = _resolve(str(spec), dtype, trust_remote_code, allow_pickle)
    model.to(device)
    model.eval()
    _ready_for_generation(model, tokenizer)
    return model, tokenizer


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer `load_model(spec)` would return, without loading (or converting) the model."""
    spec = str(spec)
    if spec in zoo.TINY:
        tokenizer = zoo.preset_tokenizer(zoo.TINY[spec].tokenizer_from)
    elif spec in zoo.PRESETS or spec.startswith(zoo.RANDOM_PREFIX):
        name = spec.removeprefix(zoo.RANDOM_PREFIX)
        if name not in zoo.PRESETS:
            raise ModelSpecError(_not_found_message(spec, "`random:` takes a zoo preset"))
        tokenizer = zoo.preset_tokenizer(name)
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
        if (folder / "adapter_config.json").is_file() and not _has_tokenizer(folder):
            tokenizer = load_tokenizer(_adapter_base(folder), trust_remote_code)
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    else:
        _check_hub_id(spec)
        tokenizer = _from_hub(spec, lambda: AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code))
    _pad_left(tokenizer)
    return tokenizer


def resolvable_base(spec: str) -> str:
    """What an adapter trained on the model ``spec`` should record as ``base_model_name_or_path`` so that plain
    ``from_pretrained`` (peft's ``AutoPeftModelForCausalLM``) finds its base without esr: a zoo preset's fp32 cache
    folder (a tiny preset is saved there first), the absolute path of a local folder, else ``spec`` itself (a hub
    id; ``random:<preset>`` has no folder). ``load_model`` maps a zoo cache folder back to its preset."""
    if spec in zoo.PRESETS:
        return str(zoo.prepare(spec, progress=False))
    if spec in zoo.TINY:
        return str(_saved_tiny(spec))
    folder = Path(spec).expanduser()
    if spec and folder.is_dir():
        return str(folder.resolve())
    return spec


def _saved_tiny(name: str) -> Path:
    """A tiny preset saved once as an ordinary HF folder under the zoo cache (same weights as ``build_tiny``)."""
    folder = zoo.cache_root() / "models" / name
    if not (folder / zoo.MARKER).is_file():
        model, tokenizer = synthetic.build_tiny(name)
        with zoo.atomic_dir(folder) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / zoo.MARKER).write_text(json.dumps({"preset": name, "tiny": True}))
    return folder


def _preset_of_folder(base: str) -> str | None:
    """The preset whose zoo cache folder ``base`` is (``.../models/<preset>``, holding the zoo marker or absent,
    e.g. on another machine), else None: such a base loads as the preset, as it did when adapters named it."""
    path = Path(base)
    if path.parent.name != "models" or path.name not in zoo.names():
        return None
    return path.name if not path.exists() or (path / zoo.MARKER).is_file() else None


def _resolve(
    spec: str, dtype: torch.dtype, trust_remote_code: bool, allow_pickle: bool = False
) -> tuple[CausalLM, PreTrainedTokenizerBase]:
    if spec in zoo.TINY:
        model, tokenizer = synthetic.build_tiny(spec)
        return model.to(dtype), tokenizer
    if spec in zoo.PRESETS:
        folder = zoo.prepare(spec, progress=True)
        model, tokenizer = _from_folder(folder, dtype, trust_remote_code=False, allow_pickle=False)
        model.name_or_path = model.config.name_or_path = spec  # adapters then record the preset, not a cache path
        return model, tokenizer
    if spec.startswith(zoo.RANDOM_PREFIX):
        if spec.removeprefix(zoo.RANDOM_PREFIX) not in zoo.PRESETS:
            raise ModelSpecError(_not_found_message(spec, "`random:` takes a zoo preset"))
        model, tokenizer = synthetic.build_random(spec)
        return model.to(dtype), tokenizer
    folder = Path(spec).expanduser()
    if folder.is_dir():
        check_model_folder(folder)  # a truncated or unreadable file is named here, not deep inside safetensors
        if (folder / "adapter_config.json").is_file():
            return _from_adapter(folder, dtype, trust_remote_code, allow_pickle)
        return _from_folder(folder, dtype, trust_remote_code, allow_pickle)
    _check_hub_id(spec)
    if allow_pickle:  # which files a hub repo holds is only known once transformers has fetched them
        log.warning("%r: allow_pickle is on, so pickle weights are loaded if the repo has no safetensors", spec)
    # The config comes first: it is small, so a wrong id or a missing network shows up before any weights move.
    config = _from_hub(spec, lambda: AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code))
    model = _from_hub(spec, lambda: AutoModelForCausalLM.from_pretrained(
        spec, config=config, dtype=dtype, trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True, weights_only=True,
    ))
    return model, _from_hub(spec, lambda: AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code))


def _from_folder(
    folder: Path, dtype: torch.dtype, trust_remote_code: bool, allow_pickle: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """An HF model folder with safetensors weights; a pickle-only folder only with ``allow_pickle``."""
    files = [p.name for p in folder.iterdir()]
    has_safetensors = any(name.endswith(".safetensors") for name in files)
    if not has_safetensors:
        pickles = [name for name in files if name.endswith(_PICKLE_SUFFIXES)]
        if not pickles:
            raise ModelSpecError(f"{str(folder)!r} is a folder but holds no model weights (*.safetensors) "
                                 "and no PEFT adapter (adapter_config.json)")
        _allow_pickle_or_refuse(folder, pickles, allow_pickle)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=has_safetensors, weights_only=True
    )
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def _from_adapter(
    folder: Path, dtype: torch.dtype, trust_remote_code: bool, allow_pickle: bool = False
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """A PEFT adapter folder: load the base it names (any spec load_model accepts) and attach the adapter."""
    if not (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_model.bin").is_file():
        _allow_pickle_or_refuse(folder, ["adapter_model.bin"], allow_pickle)  # peft would unpickle it unasked
    base, tokenizer = _resolve(_adapter_base(folder), dtype, trust_remote_code, allow_pickle)
    if _has_tokenizer(folder):  # a checkpoint may carry its own tokenizer (e.g. with added tokens)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with quiet_peft():
        return PeftModel.from_pretrained(base, folder), tokenizer


def _allow_pickle_or_refuse(folder: Path, pickles: list[str], allow_pickle: bool) -> None:
    """Pickle weights load only when asked: unpickling a file can run code hidden in it, so a downloaded folder
    must not get that power silently. Asked, they go through torch's restricted unpickler, and the log says so."""
    names = ", ".join(sorted(pickles))
    if not allow_pickle:
        raise ModelSpecError(
            f"{str(folder)!r} has only pickle weights ({names}); esr loads safetensors only, because unpickling a "
            "file can run code hidden in it. Convert it once, where you trust the file: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder) writes safetensors. "
            "Or, if you trust its source, set student.allow_pickle=true (teacher.allow_pickle=true for a teacher;"
            " --allow-pickle with esr generate and esr eval)")
    log.warning("loading pickle weights (%s) from %s because allow_pickle is on: torch's restricted unpickler "
                "(weights_only) is used, but only load pickle files from sources you trust", names, folder)


def _adapter_base(folder: Path) -> str:
    config = read_json(folder / "adapter_config.json")
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base:
        raise ModelSpecError(f"{str(folder)!r}: adapter_config.json does not name base_model_name_or_path; "
                             "set it to the preset, folder or hub id the adapter was trained on")
    return _preset_of_folder(str(base)) or str(base)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file()


def _check_hub_id(spec: str) -> None:
    """Fail at once, without network retries, when a spec cannot be a hub id or is plainly a mistyped preset."""
    hint = zoo.closest(spec, cutoff=0.8)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_like_path or not _HUB_ID.match(spec):
        raise ModelSpecError(_not_found_message(spec, "it is not a valid hub id either"))
    if "/" not in spec and hint is not None and spec.lower() not in (n.lower() for n in zoo.names()):
        raise ModelSpecError(_not_found_message(spec, "it looks like a mistyped preset, so the hub was not tried"))


def _from_hub(spec: str, fetch: Callable[[], _T]) -> _T:
    """Run a hub fetch; a missing repo or no network becomes one message listing what `spec` could have been."""
    try:
        return fetch()
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelSpecError(_not_found_message(spec, f"it could not be fetched from the hub ({reason})")) from err


def _not_found_message(spec: str, why: str) -> str:
    hint = zoo.closest(spec)
    hint_text = f" Did you mean {hint!r}?" if hint else ""
    return (f"model spec {spec!r} is not a zoo preset, nor `random:<preset>`, nor an existing folder, and {why}."
            f"{hint_text} Presets: {', '.join(zoo.names())}.")


def _pad_left(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batched generation appends to the right end of every row, so prompts must be padded on the left."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; set one before generating")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def _ready_for_generation(model: CausalLM, tokenizer: PreTrainedTokenizerBase) -> None:
    _pad_left(tokenizer)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id  # silences generate()'s per-call warning
