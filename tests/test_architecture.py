"""The shape of the package: no import cycle, layers that only look down, the CLI at the top, modules and functions
within their size budget.

The import graph is read from the source with ``ast`` (nothing is imported): an edge ``a -> b`` for every
``import esr.x.y`` / ``from esr.x import y`` / relative import in module ``a``, at module level or inside a
function, resolved to the module file it runs (``from esr.x import y`` points at ``esr.x.y`` when ``y`` is a
submodule, at the package ``esr.x`` otherwise). Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import esr

ROOT = Path(esr.__file__).resolve().parent
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

LAYERS: list[list[str]] = [
    ["esr", "esr.errors", "esr.http", "esr.types", "esr.progress", "esr.plots"],  # leaves: errors, HTTP, shapes, plots
    ["esr.config"],  # the config tree and its validation
    ["esr.data", "esr.losses", "esr.models", "esr.rollout"],  # prompts, pure losses, model loading, sampling
    ["esr.teacher", "esr.serve", "esr.eval", "esr.generate"],  # teacher scoring (local, remote), evaluation
    ["esr.optim"],  # EffOPD extrapolation and its probes (which evaluate a candidate)
    ["esr.train"],  # the session, the loop, checkpoints
    ["esr.analysis", "esr.report", "esr.export"],  # read runs and checkpoints after training; ship a checkpoint
    ["esr.cli*"],  # argument parsing and printing; imported by nothing in the library
    ["esr.__main__"],
]
"""Bottom-up. A module may import its own package and the layers below it; never a layer above, nor a sibling
package of its own layer (siblings are separate nouns: analysis does not borrow from report, nor eval from serve)."""

CLI_MODULES = ("esr.cli*", "esr.__main__")

KEPT_APART: list[tuple[str, str]] = [
    ("esr.analysis", "esr.train"),  # analyses read run folders; device, dtype, vocabulary checks are esr.models.pair
    ("esr.report", "esr.train"),  # a report reads run folders, never the trainer
    ("esr.report", "esr.analysis"),  # ... nor runs the analyses: it shows their files
]
"""Package pairs (importer, imported) that stay apart although the layers would allow the import."""

ALLOWED: set[tuple[str, str]] = set()
"""Imports that break the rules above for now, each with the reason it is tolerated."""

SIZE_ALLOWED: dict[str, int] = {}
"""Today's modules over MAX_MODULE_LINES and functions over MAX_FUNCTION_LINES (name -> lines): they may shrink,
never grow, and nothing may join them. Remove an entry once it is within budget."""


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name; a package is its ``__init__.py``."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements anywhere under ``node``, skipping the bodies of ``if TYPE_CHECKING:`` (not their else)."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
        return
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        for child in node.orelse:
            yield from _import_nodes(child)
        return
    for child in ast.iter_child_nodes(node):
        yield from _import_nodes(child)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The esr modules that module ``name`` (file ``path``) imports (module docstring)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: from the package holding this module, up level - 1 packages
            package = name.split(".") if is_package else name.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, *([base] if base else [])])
        for alias in node.names:
            target = f"{base}.{alias.name}"
            found.add(target if target in known else base)
    missing = sorted(m for m in found if (m == "esr" or m.startswith("esr.")) and m not in known)
    assert not missing, f"{name} imports {missing}, which are no modules of esr"
    return {m for m in found if m in known and m != name}


@functools.cache
def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path a -> ... -> a) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            components.append([v, *component])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(sorted(c), graph) for c in components if len(c) > 1]


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A closed path through the component's first module (breadth-first, so a shortest one)."""
    start, members = component[0], set(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:  # back at the start: walk the parents from v
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def layer_of(module: str) -> tuple[int, str]:
    """The index in LAYERS and the pattern of the most specific entry naming ``module`` or a package above it."""
    best, best_len = None, -1
    for i, patterns in enumerate(LAYERS):
        for pattern in patterns:
            names = fnmatch(module, pattern) or (pattern != "esr" and module.startswith(pattern + "."))
            if names and len(pattern) > best_len:
                best, best_len = (i, pattern), len(pattern)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best


def test_the_cycle_finder_finds_a_cycle_and_ignores_type_checking(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import esr.x\nelse:\n    import esr.y\n"
                   "def f():\n    from esr import z\n    from . import w\n")
    assert imports_of("esr.m", src, {"esr", "esr.x", "esr.y", "esr.z", "esr.w"}) == {"esr.y", "esr.z", "esr.w"}


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_library_module_imports_the_cli():
    cli = lambda m: any(fnmatch(m, p) for p in CLI_MODULES)
    bad = sorted(f"{a} -> {b}" for a, deps in import_graph().items() if not cli(a) for b in deps if cli(b))
    assert not bad, "library modules importing the CLI:\n" + "\n".join(bad)


def test_layers_only_look_down():
    graph = import_graph()
    bad = []
    for a, deps in sorted(graph.items()):
        for b in sorted(deps):
            (la, pa), (lb, pb) = layer_of(a), layer_of(b)
            apart = any(_under(a, x) and _under(b, y) for x, y in KEPT_APART)
            if (lb > la or (lb == la and pa != pb) or apart) and (a, b) not in ALLOWED:
                bad.append(f"{a} ({pa}, layer {la}) -> {b} ({pb}, layer {lb})")
    assert not bad, "imports from a higher layer, a sibling package or a package kept apart:\n" + "\n".join(bad)
    stale = sorted(ALLOWED - {(a, b) for a, deps in graph.items() for b in deps})
    assert not stale, f"ALLOWED lists imports that no longer exist: {stale}"


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def sizes() -> dict[str, int]:
    """Lines of every module over budget and of every function over budget, keyed ``path`` and ``path::qualname``."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).as_posix()
        text = path.read_text(encoding="utf-8")
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            out[rel] = n
        for qualname, node in _functions(ast.parse(text, rel)):
            if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                out[f"{rel}::{qualname}"] = n
    return out


def _functions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                yield name, child
            yield from _functions(child, name + ".")
        else:
            yield from _functions(child, prefix)


def test_modules_and_functions_stay_within_their_size_budget():
    found = sizes()
    print(f"\nover budget ({MAX_MODULE_LINES} lines a module, {MAX_FUNCTION_LINES} a function):")
    for name, n in sorted(found.items(), key=lambda kv: -kv[1]):
        print(f"  {n:4d} (allowed {SIZE_ALLOWED.get(name, '-')}) {name}")
    new = sorted(f"{k}: {n}" for k, n in found.items() if k not in SIZE_ALLOWED)
    grew = sorted(f"{k}: {n} > {SIZE_ALLOWED[k]}" for k, n in found.items() if n > SIZE_ALLOWED.get(k, n))
    stale = sorted(k for k in SIZE_ALLOWED if k not in found)
    assert not new, f"over budget and not on the allow-list (split them): {new}"
    assert not grew, f"grew past their allowance: {grew}"
    assert not stale, f"within budget now: remove from SIZE_ALLOWED: {stale}"


def test_every_user_error_is_an_esr_error_and_keeps_its_builtin():
    from esr.analysis.rollout_scores import AnalysisError
    from esr.config import ConfigError
    from esr.data import DataError
    from esr.errors import EsrError
    from esr.export import ExportError
    from esr.models import ModelSpecError
    from esr.models.zoo import ZooChecksumError, ZooPackageMissing
    from esr.report import ReportError
    from esr.serve.errors import RemoteTeacherError
    from esr.train.checkpoint import CheckpointError
    from esr.train.loop import NonFiniteLossError, RunFolderError, StepOutOfMemoryError

    for error, builtin in ((ConfigError, ValueError), (DataError, ValueError), (ModelSpecError, ValueError),
                           (ReportError, ValueError), (AnalysisError, ValueError), (ZooPackageMissing, RuntimeError),
                           (ZooChecksumError, RuntimeError), (CheckpointError, RuntimeError),
                           (NonFiniteLossError, RuntimeError), (RunFolderError, RuntimeError),
                           (StepOutOfMemoryError, RuntimeError), (RemoteTeacherError, RuntimeError),
                           (ExportError, ValueError)):
        assert issubclass(error, EsrError) and issubclass(error, builtin), error
    assert import_graph()["esr.errors"] == set()  # a leaf: every layer can raise a subclass


def test_importing_the_library_leaves_matplotlib_global_state_alone():
    """No module imports pyplot (which picks a global backend) or calls ``matplotlib.use``: the figures draw on their
    own Agg canvas, so a notebook or GUI importing esr keeps its backend."""
    code = ("import sys, importlib, matplotlib; before = matplotlib.rcParams._get_backend_or_none(); "
            "[importlib.import_module(m) for m in sys.argv[1:]]; "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'; "
            "assert matplotlib.rcParams._get_backend_or_none() == before, 'backend switched'")
    mods = [m for m in import_graph() if m.startswith(("esr.analysis", "esr.report", "esr.plots"))]
    subprocess.run([sys.executable, "-c", code, *mods], check=True, cwd=ROOT.parent)
