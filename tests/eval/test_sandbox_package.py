"""The sandbox as a package: the child's files (bootstrap and the layers it installs) run under ``python -s -S``, so
they import nothing but the standard library and each other, and leave nothing of themselves for the program."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from esr.eval import sandbox
from esr.eval.sandbox import run_program

CHILD_FILES = ("bootstrap", "isolation", "seccomp", "guard")
PACKAGE = Path(sandbox.__file__).parent


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("name", CHILD_FILES)
def test_child_files_import_only_the_standard_library_and_each_other(name):
    foreign = _imported(PACKAGE / f"{name}.py") - set(sys.stdlib_module_names) - set(CHILD_FILES) - {"__future__"}
    assert not foreign, f"{name}.py imports {sorted(foreign)}: the child runs without site-packages and esr"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox's layers are Linux-only")
def test_the_program_sees_no_module_of_the_sandbox_or_of_esr():
    code = ("import sys\nprint(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'esr', 'bootstrap', 'isolation', 'seccomp', 'guard', 'runner'}))\n"
            "try:\n    import isolation\nexcept ImportError as e:\n    print(type(e).__name__)\n")
    result = run_program(code, timeout_s=30)
    assert (result.status, result.stdout) == ("ok", "[]\nModuleNotFoundError\n"), result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox's layers are Linux-only")
def test_a_failing_programs_traceback_shows_no_sandbox_file():
    result = run_program("def f():\n    raise ValueError('boom')\nf()\n", timeout_s=30)
    assert result.status == "error" and 'program.py", line 2, in f' in result.stderr
    assert not [name for name in CHILD_FILES if f"{name}.py" in result.stderr], result.stderr
