"""The mutants of one module: small, realistic one-token bugs, found by walking its syntax tree.

Each mutation point is named by the function it is in, what it changes and its occurrence there
(``StagedRun._recover: == -> != #1``), not by line number, so the list of mutants shown equivalent
(``equivalent.py``) survives edits elsewhere in the file. Messages are not mutated: docstrings,
``logger.*`` calls (and an ``if`` that only decides whether to log) and f-strings; nor are
annotations.
"""

from __future__ import annotations

import ast
import copy
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

_COMPARE_SWAPS = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_BINOP_SWAPS = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
}
_BOOLOP_SWAPS = {ast.And: ast.Or, ast.Or: ast.And}
# Functions and methods a slip of the hand swaps for a neighbour.
_NAME_SWAPS = {
    "min": "max",
    "max": "min",
    "any": "all",
    "all": "any",
    "ceil": "floor",
    "floor": "ceil",
    "fullmatch": "match",
}
# Keywords whose value only shapes a class (dataclass fields) or checks an invariant that holds by
# construction (``zip(strict=True)``): flipping them makes mutants that are equivalent or absurd.
_INERT_KEYWORDS = frozenset({"init", "repr", "compare", "frozen", "slots", "eq", "strict"})
_SYMBOLS = {
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.And: "and",
    ast.Or: "or",
}


@dataclass(frozen=True)
class Mutant:
    """One mutation: where (``key``, stable across edits elsewhere) and the line it is on now."""

    key: str
    line: int
    index: int  # position in the walk order, to find the node again in a fresh tree


def _is_logging_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in ("logger", "logging", "warnings")
    )


def _is_logging(node: ast.AST) -> bool:
    """A logging call, its statement, or an ``if`` that only decides whether to log."""
    if isinstance(node, ast.Expr):
        return _is_logging_call(node.value)
    if isinstance(node, ast.If) and not node.orelse:
        return all(_is_logging(child) for child in node.body)
    return _is_logging_call(node)


def _is_docstring(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


class _Walker:
    """Yields ``(node, scope, description, apply)`` for every mutation point, in a fixed order."""

    def __init__(self) -> None:
        self.scope: list[str] = []

    def walk(self, node: ast.AST) -> Iterator[tuple[ast.AST, str, str]]:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            for decorator in node.decorator_list:
                yield from self.walk(decorator)
            self.scope.append(node.name)  # a default argument is keyed by its function
            if not isinstance(node, ast.ClassDef):
                for default in [*node.args.defaults, *node.args.kw_defaults]:
                    if default is not None:
                        yield from self.walk(default)
            for child in node.body:
                yield from self.walk(child)
            self.scope.pop()
            return
        if _is_docstring(node) or _is_logging(node) or isinstance(node, ast.JoinedStr):
            return
        if isinstance(node, ast.keyword) and node.arg in _INERT_KEYWORDS:
            return
        if isinstance(node, ast.AnnAssign):
            if node.value is not None:
                yield from self.walk(node.value)
            return
        yield from self._points(node)
        for child in ast.iter_child_nodes(node):
            yield from self.walk(child)

    def _points(self, node: ast.AST) -> Iterator[tuple[ast.AST, str, str]]:
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _COMPARE_SWAPS:
                    swap = _COMPARE_SWAPS[type(op)]
                    yield node, f"{_SYMBOLS[type(op)]} -> {_SYMBOLS[swap]}", f"compare:{i}"
        elif isinstance(node, ast.BinOp | ast.AugAssign) and type(node.op) in _BINOP_SWAPS:
            swap = _BINOP_SWAPS[type(node.op)]
            yield node, f"{_SYMBOLS[type(node.op)]} -> {_SYMBOLS[swap]}", "binop"
        elif isinstance(node, ast.BoolOp):
            yield node, f"{_SYMBOLS[type(node.op)]} -> {_SYMBOLS[_BOOLOP_SWAPS[type(node.op)]]}", "boolop"
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            yield node, "not x -> x", "unnot"
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            yield node, f"{node.value} -> {not node.value}", "bool"
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            yield node, f"{node.value} -> {node.value + 1}", "int"
        elif isinstance(node, ast.Constant) and type(node.value) is float:
            yield node, f"{node.value!r} -> {node.value * 2 or 1.0!r}", "float"
        elif isinstance(node, ast.If | ast.While) and not isinstance(
            node.test, ast.Compare | ast.BoolOp | ast.UnaryOp
        ):
            yield node, "if x -> if not x", "negate"
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in _NAME_SWAPS:
                yield node, f"{name}() -> {_NAME_SWAPS[name]}()", "rename"
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            yield node, "delete call statement", "delete"
        elif isinstance(node, ast.Raise | ast.Break | ast.Continue):
            yield node, f"delete {type(node).__name__.lower()}", "delete"


def _mutate(node: ast.AST, kind: str) -> ast.AST:
    """The mutated replacement of ``node`` (a copy; the tree it came from is left alone)."""
    new = copy.deepcopy(node)
    if kind.startswith("compare:"):
        i = int(kind.split(":")[1])
        new.ops[i] = _COMPARE_SWAPS[type(new.ops[i])]()
    elif kind == "binop":
        new.op = _BINOP_SWAPS[type(new.op)]()
    elif kind == "boolop":
        new.op = _BOOLOP_SWAPS[type(new.op)]()
    elif kind == "unnot":
        return new.operand
    elif kind == "bool":
        new.value = not new.value
    elif kind == "int":
        new.value += 1
    elif kind == "float":
        new.value = new.value * 2 or 1.0
    elif kind == "negate":
        new.test = ast.UnaryOp(op=ast.Not(), operand=new.test)
    elif kind == "rename":
        if isinstance(new.func, ast.Attribute):
            new.func.attr = _NAME_SWAPS[new.func.attr]
        else:
            new.func.id = _NAME_SWAPS[new.func.id]
    elif kind == "delete":
        return ast.Pass()
    return new


def _points(tree: ast.Module) -> list[tuple[ast.AST, str, str, str]]:
    walker = _Walker()
    found = []
    for node, description, kind in walker.walk(tree):
        found.append((node, ".".join(walker.scope) or "<module>", description, kind))
    return found


def mutants(source: str) -> list[Mutant]:
    """Every mutant of ``source``, keyed ``scope: description #n``."""
    seen: Counter[str] = Counter()
    found = []
    for index, (node, scope, description, _kind) in enumerate(_points(ast.parse(source))):
        base = f"{scope}: {description}"
        seen[base] += 1
        found.append(Mutant(key=f"{base} #{seen[base]}", line=node.lineno, index=index))
    return found


class _Replace(ast.NodeTransformer):
    def __init__(self, target: ast.AST, replacement: ast.AST) -> None:
        self.target, self.replacement = target, replacement

    def visit(self, node: ast.AST) -> ast.AST:
        if node is self.target:
            return self.replacement
        return super().visit(node)


def mutated_source(source: str, mutant: Mutant) -> str:
    """``source`` with the one change ``mutant`` names, as Python source."""
    tree = ast.parse(source)
    node, _scope, _description, kind = _points(tree)[mutant.index]
    tree = _Replace(node, _mutate(node, kind)).visit(tree)
    return ast.unparse(ast.fix_missing_locations(tree))
