"""The package's import graph has no cycle.

Walks every module under ``pathrobust/`` with ``ast`` and collects the imports that run when
the module is imported: statements of the module body, including those nested in ``if``,
``try``, ``with`` and class bodies, but not those inside functions (deferred on purpose) nor
under ``if TYPE_CHECKING:``. ``import a.b`` and ``from a import b`` point at the module they
name (``a.b`` when it is a module, else the package ``a``); the implicit import of a parent
package is not an edge, since Python allows a package's ``__init__`` to import its own
submodules. A cycle (a strongly connected component of two or more modules, or a module
importing itself) fails the test with the modules and the lines that close it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pathrobust"


def module_files(root: Path = ROOT / PACKAGE) -> dict[str, Path]:
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_time_statements(body: list[ast.stmt]):
    """Import statements executed when the module is imported (see the module docstring)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from import_time_statements(node.body)
            yield from import_time_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from import_time_statements(block)
        elif isinstance(node, (ast.With, ast.For, ast.While, ast.ClassDef)):
            yield from import_time_statements(node.body)


def _targets(node: ast.stmt, module: str, is_package: bool, modules: set[str]) -> list[str]:
    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Import):
        return [t for alias in node.names if (t := known(alias.name))]
    base = node.module or ""
    if node.level:  # relative: from the module's package, up level - 1 packages
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}".rstrip(".") if base else package
    out = []
    for alias in node.names:
        name = f"{base}.{alias.name}"
        target = name if name in modules else known(base)
        if target:
            out.append(target)
    return out


def import_graph(files: dict[str, Path] | None = None) -> dict[str, dict[str, int]]:
    """module -> {imported pathrobust module: line of the first such import}."""
    files = files or module_files()
    modules = set(files)
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: dict[str, int] = {}
        for node in import_time_statements(tree.body):
            for target in _targets(node, module, path.name == "__init__.py", modules):
                edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with a cycle (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, {}):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(component: list[str], graph: dict[str, dict[str, int]], files: dict[str, Path]) -> str:
    members = set(component)
    lines = [f"  {a} -> {b}  ({files[a].relative_to(ROOT)}:{line})"
             for a in component for b, line in sorted(graph[a].items()) if b in members]
    return "import cycle among " + ", ".join(component) + ":\n" + "\n".join(lines)


def test_the_walker_finds_cycles_and_ignores_deferred_imports(tmp_path):
    pkg = tmp_path / "pathrobust"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pathrobust.a import x\n")
    (pkg / "a.py").write_text("import pathrobust.b\nx = 1\n")
    (pkg / "b.py").write_text("from pathrobust import a\n")  # a <-> b
    (pkg / "c.py").write_text("def f():\n    import pathrobust.d\n")  # deferred: no edge
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pathrobust.c\n"
                              "from .sub import e\n")
    (pkg / "sub" / "__init__.py").write_text("from . import e\n")  # a package importing its submodule
    (pkg / "sub" / "e.py").write_text("from .. import c\nclass K:\n    from pathrobust.sub import f\n")
    (pkg / "sub" / "f.py").write_text("")
    files = module_files(pkg)
    graph = import_graph(files)
    assert graph["pathrobust.c"] == {} and "pathrobust.c" not in graph["pathrobust.d"]
    assert graph["pathrobust.d"] == {"pathrobust.sub.e": 4}
    assert set(graph["pathrobust.sub.e"]) == {"pathrobust.c", "pathrobust.sub.f"}
    assert graph["pathrobust.sub"] == {"pathrobust.sub.e": 1}
    assert cycles(graph) == [["pathrobust.a", "pathrobust.b"]]


def test_no_import_cycles_in_the_package():
    files = module_files()
    graph = import_graph(files)
    assert len(graph) > 50 and "pathrobust.registry" in graph["pathrobust.encoders.bioptimus"]
    found = cycles(graph)
    assert not found, "\n".join(describe(c, graph, files) for c in found)


def test_weights_and_the_registry_import_no_encoder_module():
    """weights.py finds and reads checkpoints; the encoders build on it, never the reverse
    (not even deferred). The registry imports the encoder catalog only at its first lookup."""
    graph = import_graph()
    for module in ("pathrobust.weights", "pathrobust.registry", "pathrobust.trust"):
        assert not [m for m in graph[module] if m.startswith("pathrobust.encoders")], (module, graph[module])
    assert "pathrobust.weights" in graph["pathrobust.encoders.backbone"]
    tree = ast.parse((ROOT / "pathrobust" / "weights.py").read_text())
    anywhere = [n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(tree)
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names]
    assert not [m for m in anywhere if m and m.startswith("pathrobust.encoders")], anywhere
    registry = (ROOT / "pathrobust" / "registry.py").read_text()
    assert "import_module(\"pathrobust" not in registry and "pathrobust.encoders.catalog" not in registry
