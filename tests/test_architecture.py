"""The modules' import graph: no circles among tw_env, agents and scripts, not even through an import
inside a function (which only hides a circle until someone moves it to the top)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tw_env", "agents", "scripts")


def project_modules() -> dict[str, Path]:
    """Every module of the three packages, by dotted name (a package by its own name)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (top level, functions, TYPE_CHECKING blocks)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from package import module` imports the module; `from module import name`, the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import tw_env.models.x`: the longest project prefix
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as ``[a, b, ..., a]``, or None when it has none (depth-first search)."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph[node]):
            if nxt in on_path:
                return [*path[path.index(nxt):], nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def test_the_graph_reader_sees_imports_inside_functions_and_finds_circles(tmp_path):
    modules = {"tw_env.a": tmp_path / "a.py", "tw_env.b": tmp_path / "b.py", "tw_env": tmp_path / "__init__.py"}
    modules["tw_env.a"].write_text("import os\nfrom tw_env import b\n")
    modules["tw_env.b"].write_text("def f():\n    from tw_env.a import g\n    return g\n")
    modules["tw_env"].write_text("from .a import x\n")
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph == {"tw_env.a": {"tw_env.b"}, "tw_env.b": {"tw_env.a"}, "tw_env": {"tw_env.a"}}
    assert find_cycle(graph) == ["tw_env.a", "tw_env.b", "tw_env.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_no_import_circles_among_the_modules():
    graph = import_graph()
    assert {"tw_env.models", "tw_env.families", "agents.policy", "scripts.evaluate"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_family_files_sit_below_the_model_loader():
    """tw_env/models.py loads through the families; the family files never import it (nor the registry)."""
    graph = import_graph()
    for family_file in ("tw_env.model_family", "tw_env.incremental", "tw_env.causal_incremental"):
        assert not graph[family_file] & {"tw_env.models", "tw_env.families"}, family_file
    assert "tw_env.families" in graph["tw_env.models"]


@pytest.mark.parametrize("name", sorted(project_modules()))
def test_every_module_imports(name):
    importlib.import_module(name)
