"""The mutation report: kill rate per module against the bars of issue 23, and every survivor."""

from __future__ import annotations

from pathlib import Path

from tools.mutation.runner import SURVIVED

GUARD_BAR, OVERALL_BAR = 0.90, 0.85


def summarize(result: dict) -> dict:
    """Counts for one module: equivalent mutants are those listed that survived."""
    rows = result["mutants"]
    listed = result["equivalent"]
    survivors = [r for r in rows if r["verdict"] == SURVIVED and r["key"] not in listed]
    equivalent = [r for r in rows if r["verdict"] == SURVIVED and r["key"] in listed]
    wrongly_listed = [r["key"] for r in rows if r["verdict"] != SURVIVED and r["key"] in listed]
    counted = len(rows) - len(equivalent)
    return {
        "mutants": len(rows),
        "equivalent": equivalent,
        "survivors": survivors,
        "wrongly_listed": wrongly_listed,
        "killed": counted - len(survivors),
        "counted": counted,
        "rate": (counted - len(survivors)) / counted if counted else 1.0,
    }


def render_report(results: dict[str, dict]) -> str:
    lines = [
        "# Mutation testing",
        "",
        "`python -m tools.mutation` (docs/mutation-testing.md): each module against its own tests only.",
        f"Bars (issue 23): {GUARD_BAR:.0%} of non-equivalent mutants killed in each module that guards user "
        f"data, {OVERALL_BAR:.0%} overall.",
        "",
        "| module | tests | mutants | equivalent | killed | survived | kill rate | bar | run (s) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    total_counted = total_killed = 0
    summaries = {name: summarize(result) for name, result in results.items()}
    for name, result in results.items():
        s = summaries[name]
        total_counted += s["counted"]
        total_killed += s["killed"]
        bar = GUARD_BAR if result["guards_data"] else None
        verdict = "" if bar is None else ("met" if s["rate"] >= bar else "**missed**")
        tests = ", ".join(Path(t).name for t in result["tests"])
        lines.append(
            f"| {name} (`{result['module']}`) | {tests} | {s['mutants']} | {len(s['equivalent'])} | "
            f"{s['killed']} | {len(s['survivors'])} | {s['rate']:.1%} | "
            f"{f'{bar:.0%} ' + verdict if bar else ''} | {result['seconds']:.0f} |"
        )
    overall = total_killed / total_counted if total_counted else 1.0
    met = "met" if overall >= OVERALL_BAR else "**missed**"
    lines += [
        "",
        f"Overall: {total_killed} of {total_counted} non-equivalent mutants killed, "
        f"{overall:.1%} (bar {OVERALL_BAR:.0%}: {met}).",
        "",
    ]
    for name, result in results.items():
        s = summaries[name]
        if not (s["survivors"] or s["equivalent"] or s["wrongly_listed"] or result["stale_equivalent"]):
            continue
        lines += [f"## {name}", ""]
        for row in s["survivors"]:
            lines.append(f"- survived: `{row['key']}` (line {row['line']}: `{row['code']}`)")
        for row in s["equivalent"]:
            lines.append(
                f"- equivalent: `{row['key']}` (line {row['line']}): {result['equivalent'][row['key']]}"
            )
        for key in s["wrongly_listed"]:
            lines.append(f"- listed as equivalent but killed (remove it from equivalent.py): `{key}`")
        for key in result["stale_equivalent"]:
            lines.append(f"- listed as equivalent but no longer a mutant (remove it): `{key}`")
        lines.append("")
    return "\n".join(lines) + "\n"
