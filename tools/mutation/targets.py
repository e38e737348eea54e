"""The modules mutation testing covers, each with its own test files (tests mirror modules).

``guards_data``: the module decides what is written, kept or deleted on the user's disk; these must
kill at least 90% of their non-equivalent mutants (issue 23), the rest 85% taken together.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str  # what the report calls it
    module: str
    tests: tuple[str, ...]
    guards_data: bool = False

    @property
    def path(self) -> str:
        return self.module.replace(".", "/") + ".py"


TARGETS = (
    Target("staging", "pruning.rundir.staging", ("tests/test_staging.py",), guards_data=True),
    Target("run directory + manifest", "pruning.rundir.target", ("tests/test_target.py",), guards_data=True),
    Target("locking", "pruning.rundir.lock", ("tests/test_lock.py",), guards_data=True),
    Target("surgery", "pruning.surgery", ("tests/test_surgery.py",)),
    Target("planner", "pruning.planning.planner", ("tests/test_planner.py",)),
    Target("shape rounding", "pruning.planning.rounding", ("tests/test_rounding.py",)),
    Target("greedy OBS", "pruning.compensation.obs", ("tests/test_obs.py",)),
    Target("refit", "pruning.compensation.refit", ("tests/test_compensation.py",)),
    Target("layout", "pruning.families.layout", ("tests/test_layout.py",)),
    Target("checkpoint save", "pruning.checkpoint.save", ("tests/test_checkpoint.py",)),
    Target(
        "checkpoint load",
        "pruning.checkpoint.load",
        ("tests/test_checkpoint.py", "tests/test_load_bounds.py"),
    ),
    Target(
        "checkpoint load checks",
        "pruning.checkpoint.load_checks",
        ("tests/test_checkpoint.py", "tests/test_load_bounds.py"),
    ),
)
