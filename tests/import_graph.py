"""The package's own import graph, read from its source: every ``import`` of a ``pruning`` module,
at module level or inside a function, as an edge from the importing module to the imported one.

Importing ``pruning.a.b`` from outside the package ``pruning.a`` runs ``pruning/a/__init__.py`` first,
so such an import is also an edge to ``pruning.a``; from inside it the package is already being
imported, and it is not. The root package ``pruning`` contains every module, so no module reaches its
``__init__`` that way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pruning

PACKAGE = Path(pruning.__file__).parent


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (packages by their ``__init__``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement may load: the module, and each imported name as a submodule."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against the importing module's package
            base = module.split(".")
            base = base[: len(base) - node.level + (1 if is_package else 0)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        return [origin] + [f"{origin}.{alias.name}" for alias in node.names]
    return []


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (directly, or through a package's ``__init__``)."""
    files = module_files()
    graph: dict[str, set[str]] = {name: set() for name in files}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for name in _imported(node, module, is_package):
                parts = name.split(".")
                for depth in range(1, len(parts) + 1):  # the module and the packages on the way
                    target = ".".join(parts[:depth])
                    if target in files and target != module and not _contains(target, module):
                        graph[module].add(target)
    return graph


def _contains(package: str, module: str) -> bool:
    """Whether ``module`` is inside ``package`` (whose ``__init__`` is then already being imported)."""
    return module.startswith(package + ".")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found
