"""The package's layout rules (docs/design.md, "Layout"), checked on the source.

- No module imports a `_private` name (a module, function or class whose name
  starts with an underscore) from another subpackage.
- No import circles among modules, counting imports inside functions too.
- Every subpackage's `__init__.py` says what it owns.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "keras_tandem"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(module: str) -> str:
    """`keras_tandem.serving._batching` -> `serving`; a top-level module is its own package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(path: Path, module: str, known: set[str]) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for each import of ours in `path`."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names
                      if a.name.startswith("keras_tandem")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("keras_tandem"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:  # `from package import module`
                    found.append((sub, None, node.lineno))
                else:
                    found.append((base, alias.name, node.lineno))
    return found


def test_no_module_imports_a_private_name_from_another_subpackage():
    modules = _modules()
    known = set(modules)
    offences = []
    for module, path in modules.items():
        for target, name, line in _imports(path, module, known):
            if _package_of(target) == _package_of(module):
                continue
            private = [p for p in target.split(".")[1:] if p.startswith("_")]
            if name is not None and name.startswith("_") and name != "__version__":
                private.append(name)
            if private:
                offences.append(f"{path.relative_to(ROOT)}:{line} imports {target}"
                                f"{'.' + name if name else ''}")
    assert not offences, "private names imported across subpackages:\n" + "\n".join(offences)


def test_no_import_circles():
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for target, _name, _line in _imports(path, module, known):
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            # A package's __init__ re-exporting its own modules is not a circle.
            if target != module and not target.startswith(module + "."):
                edges.add(target)
        graph[module] = edges

    # A module importing its own package's __init__ only to reach a sibling is
    # the normal way Python packages work; count only module-to-module edges.
    def is_package(name: str) -> bool:
        return modules[name].name == "__init__.py"

    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if is_package(nxt):
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("package", ["serving", "training", "data", "cluster", "server", "bench"])
def test_every_subpackage_says_what_it_owns(package):
    init = ROOT / package / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc.split()) >= 12, f"{init} needs a docstring saying what it owns"
