"""RELIABILITY.md names a test for every fault it lists; this keeps the names honest, so the document cannot point at
a test that was renamed, moved or never written."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NODE_ID = re.compile(r"(tests/[\w/.-]+\.py)::(\w+)")


def _test_functions(path: Path) -> set[str]:
    """Names of the test functions a file defines, at module level or in a test class."""
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")}


def test_every_test_named_in_reliability_md_exists():
    ids = NODE_ID.findall((REPO / "RELIABILITY.md").read_text())
    assert len(ids) >= 10, "RELIABILITY.md should name the tests behind its tables"
    missing = []
    for file, name in ids:
        path = REPO / file
        if not path.is_file() or name not in _test_functions(path):
            missing.append(f"{file}::{name}")
    assert not missing, f"RELIABILITY.md names tests that do not exist: {missing}"
