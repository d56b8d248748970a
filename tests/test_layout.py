"""The package layout: imports only go down the layers, no import cycles (function-level imports included), no
module over 400 lines, and `import amas` stays free of torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "amas"
MAX_LINES = 400

# Higher layers may import lower ones (and their own layer), never a higher one. A module is placed by its longest
# prefix here. amas.files.atomic is a 40-line stdlib helper under the config (config writes files atomically).
LAYERS: dict[str, int] = {
    "amas.config": 0, "amas.config_yaml": 0, "amas.config_check": 0, "amas.console": 0, "amas.distributed": 0,
    "amas.errors": 0,
    "amas.files.atomic": 0,
    "amas.channels": 1, "amas.engine": 1, "amas.files": 1, "amas.data": 1, "amas.datasets": 1, "amas.inputs": 1,
    "amas.models": 1, "amas.dense": 1,
    "amas.search": 2, "amas.tasks": 2, "amas.criteria": 2, "amas.latency": 2, "amas.quant": 2,
    "amas.pipeline": 3,
    "amas.cli": 4, "amas.api": 4, "amas.lightning": 4, "amas.__main__": 4, "amas.__init__": 4,
}


def _modules() -> dict[str, Path]:
    """Dotted name -> file for every module of the package (a package's __init__ under the package's name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def layer(module: str) -> int:
    """The layer of a module: its longest prefix in LAYERS (the package root `amas` is the public API on top)."""
    if module == "amas":
        return LAYERS["amas.__init__"]
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{module} has no layer in LAYERS"
    return LAYERS[best]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported amas module, line, runs when executed) for every import in a file.

    Imports inside functions run (when the function is called) and so count for cycles; imports under
    `if TYPE_CHECKING:` never run: they count for the direction of the layers only.
    """
    found: list[tuple[str, int, bool]] = []

    def targets(node: ast.stmt) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from amas.x import y` imports amas.x.y where that is a module, else amas.x
            return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names]
        return []

    def walk(nodes: list, runs: bool) -> None:
        for node in nodes:  # statements, except handlers and match cases (which hold statements)
            for name in targets(node):
                if name == "amas" or name.startswith("amas."):
                    found.append((name, node.lineno, runs))
            if isinstance(node, ast.If) and _is_type_checking(node):
                walk(node.body, False)  # for type checkers only: counts for the direction, not for cycles
                walk(node.orelse, runs)
                continue
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    walk(inner, runs)

    walk(tree.body, True)
    return found


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(import graph of the imports that run, every import as (importer, imported, line))."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    every: list[tuple[str, str, int]] = []
    for name, path in modules.items():
        for target, line, runs in _imports(ast.parse(path.read_text()), modules):
            if target == "amas":  # the package root (amas.__version__) is loaded before any of its modules
                continue
            every.append((name, target, line))
            if runs and target != name:
                graph[name].add(target)
    return graph, every


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt in graph and state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_module_has_a_layer():
    for name in _modules():
        layer(name)


def test_imports_only_go_down_the_layers():
    _, every = _graph()
    upward = [f"{src}:{line} imports {dst} (layer {layer(src)} -> {layer(dst)})"
              for src, dst, line in every if layer(dst) > layer(src)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph, _ = _graph()
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_no_private_names_imported_across_modules():
    """A name another module needs is public in the module that owns it (tests may reach into privates)."""
    private = [f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}"
               for path in PACKAGE.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("amas")
               for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, "\n".join(private)


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_layout_checks_see_a_cycle_and_an_upward_import():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert layer("amas.pipeline.runner") > layer("amas.channels.masks") > layer("amas.errors")


def test_layout_checks_see_imports_inside_functions_but_not_type_checking_ones():
    source = """
from typing import TYPE_CHECKING
import amas.errors
if TYPE_CHECKING:
    from amas.config import Config
def f():
    try:
        from amas.models.registry import register_model
    except ImportError:
        import amas.console
class C:
    def g(self):
        with open("x"):
            import amas.engine.loop
"""
    found = {name: runs for name, _, runs in _imports(ast.parse(source), _modules())}
    assert found == {"amas.errors": True, "amas.config": False, "amas.models.registry": True, "amas.console": True,
                     "amas.engine.loop": True}, found


def test_import_amas_does_not_import_torch():
    code = "import sys, amas; print(sorted(m for m in ('torch', 'numpy', 'torch_pruning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
