"""The floor plan holds: no import circle, small files, criteria known only to their own wing, and a
new criterion is one file plus one registry line (docs/architecture.md)."""

from __future__ import annotations

import ast
import json
import sys
import textwrap
from pathlib import Path

import pytest

from pruning.criteria.registry import CRITERIA
from tests.import_graph import PACKAGE, cycles, import_graph
from tests.tiny_pipeline import build_tiny_model_dir, write_config

REPO = PACKAGE.parent
MAX_LINES = 400


def test_the_package_has_no_import_circle() -> None:
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 200  # the graph was read, not empty
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle_through_a_package_init() -> None:
    graph = {"p": {"p.a"}, "p.a": {"q.b"}, "q.b": {"p"}, "q": set()}
    assert cycles(graph) == [["p", "p.a", "q.b"]]


def test_importing_a_submodule_from_outside_its_package_runs_the_package_init() -> None:
    graph = import_graph()
    # pipeline/__init__ re-exports run_pipeline; the CLI imports pruning.pipeline.run inside a function
    assert "pruning.pipeline" in graph["pruning.cli"]
    # inside the package its own __init__ is already being imported: no edge back to it
    assert "pruning.pipeline" not in graph["pruning.pipeline.run"]


@pytest.mark.parametrize("folder", ["pruning", "benchmarks", "tools"])
def test_no_source_file_is_over_400_lines(folder: str) -> None:
    long = {
        str(path.relative_to(REPO)): n
        for path in sorted((REPO / folder).rglob("*.py"))
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def _criterion_literals(tree: ast.AST) -> list[ast.Constant]:
    """String constants naming a criterion that are compared with something or used as a key."""
    names = set(CRITERIA.names())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.Subscript):
            operands = [node.slice]
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        else:
            continue
        for operand in operands:
            elements = operand.elts if isinstance(operand, ast.Tuple | ast.List | ast.Set) else [operand]
            found += [e for e in elements if isinstance(e, ast.Constant) and e.value in names]
    return found


def test_no_module_outside_criteria_compares_a_criterion_name() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "criteria":
            continue
        for node in _criterion_literals(ast.parse(path.read_text(encoding="utf-8"))):
            found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value!r}")
    assert found == []


def test_the_literal_finder_sees_comparisons_keys_and_memberships() -> None:
    source = 'a == "taylor"\nb in ("x", "obs")\nc["magnitude"]\nd = "activation"\n'
    assert [n.value for n in _criterion_literals(ast.parse(source))] == ["taylor", "obs", "magnitude"]


TOY_CRITERION = '''
"""A toy criterion: the lower a structure's index, the less it is worth."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from pruning.criteria.base import Criterion
from pruning.families import adapter_for
from pruning.planning.scores import StructureScores

SEEN: list[dict] = []


@dataclass
class IndexCriterion(Criterion):
    name: ClassVar[str] = "by_index"
    needs_data: ClassVar[bool] = False
    batch_size: int = 1

    def score(self, model, windows):
        SEEN.append({"batch_size": self.batch_size, "windows": windows})
        adapter = adapter_for(model.config)
        head_dim = adapter.head_dim(model.config)
        attention, mlp = [], []
        for layer in adapter.decoder_layers(model):
            geometry = adapter.geometry(layer, head_dim)
            attention.append(torch.arange(geometry.num_kv_heads, dtype=torch.float32) + 1e6)
            mlp.append(torch.arange(geometry.intermediate_size, dtype=torch.float32) + 1)
        return StructureScores(attention, mlp, common_scale=True)
'''


@pytest.fixture
def toy_criterion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The toy's file in a package of its own, registered with the one line a new criterion takes."""
    package = tmp_path / "toy_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "by_index.py").write_text(textwrap.dedent(TOY_CRITERION))
    monkeypatch.syspath_prepend(str(tmp_path))
    from toy_package.by_index import IndexCriterion  # noqa: PLC0415 - written by this fixture

    CRITERIA.register(IndexCriterion)  # the registry line
    yield sys.modules["toy_package.by_index"]
    CRITERIA.unregister(IndexCriterion.name)


def test_a_new_criterion_is_one_file_and_one_registry_line(tmp_path: Path, toy_criterion) -> None:
    from pruning.config import load_config
    from pruning.pipeline import run_pipeline

    model = build_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", model, out, pruning={"ratio": 0.1, "importance": "by_index"})
    run_pipeline(load_config(config))

    # the config took the new name (no schema edit), the run offered it its option, and no windows
    assert toy_criterion.SEEN == [{"batch_size": 2, "windows": None}]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["criterion"] == "by_index"
    removed = [layer["remove_channels"] for layer in plan["layers"]]
    assert sum(map(len, removed)) > 0 and all(
        kv == [] for kv in (x["remove_kv_groups"] for x in plan["layers"])
    )
    assert all(channels == list(range(len(channels))) for channels in removed)  # the lowest indices went


def test_an_unregistered_name_is_one_line_naming_the_known_ones(tmp_path: Path) -> None:
    from pruning.config import load_config
    from pruning.errors import UserError

    config = write_config(
        tmp_path / "c.yaml", tmp_path, tmp_path / "out", pruning={"ratio": 0.1, "importance": "by_index"}
    )
    with pytest.raises(UserError, match="pruning.importance: 'by_index' is not one of") as caught:
        load_config(config)
    assert all(name in str(caught.value) for name in CRITERIA.names())


def test_importing_the_package_root_imports_no_wing() -> None:
    """``import pruning`` is the facade: its lazy ``load_pruned_model`` must not load torch or a wing."""
    import subprocess

    probe = (
        "import sys, pruning; print(sorted(m for m in sys.modules if m.startswith(('pruning.', 'torch'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
