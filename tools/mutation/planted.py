"""The twelve bugs issue 23 planted by hand, one line (or two) each, that the suite once let through.

``python -m tools.mutation --planted`` plants each alone and runs its module's tests: every one must
now be caught, and the report names the tests that caught it. Each bug is an exact replacement of text
that occurs once in the module, so a refactoring that moves the text shows as "not found", not as a pass.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Planted:
    module: str
    what: str  # what the bug would do to a user
    old: str
    new: str


PLANTED = (
    Planted(
        "pruning.rundir.staging",
        "a user's directory named like a leftover (.out.staging-1-abcdef12.bak) deleted by the next run",
        "if pattern.fullmatch(p.name)",
        "if pattern.match(p.name)",
    ),
    Planted(
        "pruning.rundir.staging",
        "no rollback when the fallback's second rename fails: the target is lost",
        "            os.rename(old, self.target)\n            raise",
        "            raise",
    ),
    Planted(
        "pruning.rundir.staging",
        "one of several complete previous runs restored arbitrarily",
        "len(restorable) == 1",
        "len(restorable) >= 1",
    ),
    Planted(
        "pruning.rundir.target",
        "a symlinked run.json taken as a manifest",
        "if not record_file.is_file() or record_file.is_symlink():",
        "if not record_file.is_file():",
    ),
    Planted(
        "pruning.rundir.target",
        "output dir == model dir no longer an overlap",
        "return child == parent or parent in child.parents",
        "return parent in child.parents",
    ),
    Planted(
        "pruning.rundir.target",
        "a file two levels deep (analysis/plots/a.png) called foreign",
        "    for rel in list(listed_dirs):\n        listed_dirs.update(str(p) for p in Path(rel).parents)\n",
        "",
    ),
    Planted(
        "pruning.planning.rounding",
        "a minimum one above an allowed count (33 with multiple_of 16) undercut to 32",
        "floor = math.ceil(minimum / step) * step",
        "floor = minimum // step * step",
    ),
    Planted(
        "pruning.planning.rounding",
        "a block whose size is no multiple keeps counts that are no multiples either (its remainder "
        "chunk dropped)",
        "sizes = ([size % step] if size % step else []) + [step] * (size // step)",
        "sizes = [step] * (size // step)",
    ),
    Planted(
        "pruning.compensation.obs",
        "the limit no longer caps the last chunk: more structures removed than asked",
        "torch.argsort(single)[: min(chunk, limit - len(order))]",
        "torch.argsort(single)[:chunk]",
    ),
    Planted(
        "pruning.compensation.obs",
        "count // steps instead of ceil: more steps than allowed",
        "chunk = max(1, math.ceil(count / steps))",
        "chunk = max(1, count // steps)",
    ),
    Planted(
        "pruning.compensation.obs",
        "the periodic exact refresh replaced by a copy of the weights",
        "w, h_inv = _exact_state(original, h, idx[alive_ids].flatten())",
        "w, h_inv = original.clone(), torch.cholesky_inverse(torch.linalg.cholesky(h))",
    ),
    Planted(
        "pruning.families.layout",
        "a layout without version read as version 1",
        'version = data.get("version")',
        'version = data.get("version", LAYOUT_VERSION)',
    ),
)


def plant(source: str, bug: Planted) -> str:
    """``source`` with ``bug`` planted; ValueError if its text is not found exactly once."""
    if source.count(bug.old) != 1:
        raise ValueError(
            f"{bug.module}: the text to replace occurs {source.count(bug.old)} times: {bug.old!r}"
        )
    return source.replace(bug.old, bug.new)
