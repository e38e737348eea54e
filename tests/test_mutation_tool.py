"""The mutation tester (tools/mutation): its mutants are the bugs they claim, and its runner tells a
killed mutant from a survivor. Its verdicts decide which tests get written, so it is tested like code."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO
from tools.mutation.operators import mutants, mutated_source
from tools.mutation.report import render_report, summarize

SOURCE = textwrap.dedent(
    '''
    import logging
    import re

    logger = logging.getLogger(__name__)


    def clamp(x: int, low: int = 0) -> int:
        """Docstrings are never mutated."""
        if x < low and not re.fullmatch(r"\\d+", str(x)):
            logger.warning("below %d", low)
            return max(low, x + 1)
        if x:
            logger.info(f"{x * 2}")
        if x:
            return x
        return low
    '''
)


def _keys(source: str) -> list[str]:
    return [m.key for m in mutants(source)]


def test_every_mutation_point_is_keyed_by_function_change_and_occurrence():
    assert _keys(SOURCE) == [
        "clamp: 0 -> 1 #1",  # the default
        "clamp: and -> or #1",
        "clamp: < -> <= #1",
        "clamp: not x -> x #1",
        "clamp: fullmatch() -> match() #1",
        "clamp: max() -> min() #1",
        "clamp: + -> - #1",
        "clamp: 1 -> 2 #1",
        "clamp: if x -> if not x #1",
    ]  # the docstring, the logging statements, the if that only logs and the f-string: none


@pytest.mark.parametrize(
    ("key", "changed"),
    [
        ("clamp: < -> <= #1", "if x <= low and"),
        ("clamp: and -> or #1", "if x < low or not"),
        ("clamp: not x -> x #1", "and re.fullmatch("),
        ("clamp: fullmatch() -> match() #1", "re.match("),
        ("clamp: max() -> min() #1", "return min(low, x + 1)"),
        ("clamp: + -> - #1", "max(low, x - 1)"),
        ("clamp: 1 -> 2 #1", "max(low, x + 2)"),
        ("clamp: 0 -> 1 #1", "low: int=1"),
        ("clamp: if x -> if not x #1", "if not x:\n        return x"),
    ],
)
def test_each_mutant_changes_exactly_what_its_key_says(key: str, changed: str):
    mutant = next(m for m in mutants(SOURCE) if m.key == key)
    after = mutated_source(SOURCE, mutant)
    assert changed in after
    original = ast.unparse(ast.parse(SOURCE))
    differing = [(a, b) for a, b in zip(original.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(differing) == 1  # one change, on one line


def test_statements_are_deleted_but_never_a_logging_call():
    source = "def f(path, log):\n    path.unlink()\n    log.info('x')\n    raise ValueError\n"
    assert _keys(source) == [
        "f: delete call statement #1",
        "f: delete call statement #2",
        "f: delete raise #1",
    ]
    deleted = mutated_source(source, mutants(source)[2])
    assert "raise" not in deleted and "pass" in deleted


def test_keys_survive_edits_elsewhere_in_the_file():
    """Equivalent mutants are listed by key: a line added above must not rename them."""
    edited = "import os\n\n\ndef other():\n    return 1 + 1\n" + SOURCE
    assert set(_keys(SOURCE)) <= set(_keys(edited))


def test_the_report_counts_equivalents_apart_and_flags_wrong_listings():
    rows = [
        {"key": "f: < -> <= #1", "line": 3, "code": "x < y", "verdict": "killed"},
        {"key": "f: 1 -> 2 #1", "line": 4, "code": "y = 1", "verdict": "survived"},
        {"key": "f: + -> - #1", "line": 5, "code": "a + b", "verdict": "survived"},
        {"key": "f: and -> or #1", "line": 6, "code": "a and b", "verdict": "timeout"},
    ]
    result = {
        "module": "m",
        "tests": ["tests/test_m.py"],
        "guards_data": True,
        "seconds": 1.0,
        "mutants": rows,
        "equivalent": {"f: 1 -> 2 #1": "y is overwritten before use", "f: < -> <= #1": "claimed"},
        "stale_equivalent": ["g: gone #1"],
    }
    summary = summarize(result)
    assert (summary["counted"], summary["killed"], [r["key"] for r in summary["survivors"]]) == (
        3,
        2,
        ["f: + -> - #1"],
    )
    assert summary["wrongly_listed"] == ["f: < -> <= #1"]
    text = render_report({"m": result})
    assert "| 4 | 1 | 2 | 1 | 66.7% | 90% **missed** |" in text
    assert "listed as equivalent but killed (remove it from equivalent.py): `f: < -> <= #1`" in text
    assert "no longer a mutant (remove it): `g: gone #1`" in text


def _run_mutants(tmp_path: Path, module: str, source: str, test: str, keys: list[str] | None, timeout: int):
    """Run the runner in a fresh interpreter (it forks, and must not run inside pytest's own process) on a
    toy module and its test; returns the printed verdicts, as ``key verdict seconds`` lines."""
    (tmp_path / f"{module}.py").write_text(source)
    (tmp_path / f"test_{module}.py").write_text(test)
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path[:0] = [{str(REPO)!r}, {str(tmp_path)!r}]
        from tools.mutation.operators import mutants, mutated_source
        from tools.mutation.runner import Job, run_jobs
        path = Path({str(tmp_path / f"{module}.py")!r})
        found = [m for m in mutants(path.read_text()) if {keys!r} is None or m.key in {keys!r}]
        tests = ({str(tmp_path / f"test_{module}.py")!r},)
        jobs = [Job({module!r}, path, mutated_source(path.read_text(), m), tests) for m in found]
        run_jobs(jobs, 2, {timeout}, lambda i, verdict, s: print(found[i].key, "|", verdict, round(s)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True
    )
    return sorted(out.stdout.strip().splitlines())


def test_the_runner_kills_a_mutant_its_test_catches_and_keeps_one_it_cannot(tmp_path: Path):
    """End to end: ``+ -> -`` is caught, the unused ``1 -> 2`` survives, the source file is never
    changed, and pytest's exit code decides."""
    source = "UNUSED = 1\n\n\ndef add(a, b):\n    return a + b\n"
    test = "from toy import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
    lines = _run_mutants(tmp_path, "toy", source, test, None, 60)
    assert [line.rsplit(" ", 1)[0] for line in lines] == [
        "<module>: 1 -> 2 #1 | survived",
        "add: + -> - #1 | killed",
    ]
    assert (tmp_path / "toy.py").read_text() == source


def test_a_mutant_that_hangs_is_killed_by_the_timeout(tmp_path: Path):
    source = "def spin(n):\n    while n > 0:\n        n -= 1\n    return n\n"
    test = "from loop import spin\n\n\ndef test_spin():\n    assert spin(3) == 0\n"
    (line,) = _run_mutants(tmp_path, "loop", source, test, ["spin: - -> + #1"], 3)  # n += 1: never ends
    verdict, seconds = line.split(" | ")[1].split()
    assert verdict == "timeout" and 3 <= int(seconds) < 10


@pytest.mark.parametrize("index", range(12))
def test_every_planted_bug_still_plants_into_its_module(index: int):
    """``--planted`` re-checks issue 23's twelve bugs; a refactoring that moves their text must update
    tools/mutation/planted.py rather than let the check go quietly stale."""
    from tools.mutation.planted import PLANTED, plant

    bug = PLANTED[index]
    source = (REPO / (bug.module.replace(".", "/") + ".py")).read_text()
    planted = plant(source, bug)
    assert planted != source
    compile(planted, bug.module, "exec")


def test_a_planted_bug_whose_text_is_gone_is_refused():
    from tools.mutation.planted import Planted, plant

    with pytest.raises(ValueError, match="occurs 0 times"):
        plant("x = 1\n", Planted("m", "nothing", "y = 2", "y = 3"))
