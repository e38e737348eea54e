"""``python -m tools.mutation [--module staging ...]``: mutate each target module, run its own tests
against every mutant, and write the kill rates and the survivors to benchmarks/results/mutation.md.

Results accumulate in mutation.json by module, so modules can be run one at a time; the report always
covers every module measured so far. See docs/mutation-testing.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tools.mutation.equivalent import EQUIVALENT
from tools.mutation.operators import mutants, mutated_source
from tools.mutation.planted import PLANTED, plant
from tools.mutation.report import render_report
from tools.mutation.runner import KILLED, SURVIVED, TIMEOUT, Job, run_jobs, warm_up
from tools.mutation.targets import TARGETS, Target

logger = logging.getLogger("mutation")
REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"


def _chosen(names: list[str] | None) -> list[Target]:
    if not names:
        return list(TARGETS)
    chosen = [t for t in TARGETS if any(n in (t.name, t.module, t.module.rsplit(".", 1)[-1]) for n in names)]
    unknown = [
        n for n in names if not any(n in (t.name, t.module, t.module.rsplit(".", 1)[-1]) for t in TARGETS)
    ]
    if unknown:
        raise SystemExit(
            f"--module: unknown {', '.join(unknown)}; known: {', '.join(t.name for t in TARGETS)}"
        )
    return chosen


def _measure(target: Target, workers: int, only: str | None) -> dict:
    path = REPO / target.path
    source = path.read_text()
    found = [m for m in mutants(source) if only is None or only in m.key]
    lines = source.splitlines()
    baseline: list[tuple[str, float]] = []
    log = Path(tempfile.gettempdir()) / f"mutation-baseline-{os.getpid()}.log"
    run_jobs(
        [Job(target.module, path, source, target.tests, log)],
        1,
        600,
        lambda _i, v, s: baseline.append((v, s)),
    )
    if baseline[0][0] != SURVIVED:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{target.name}: its tests fail on the unmutated module ({target.tests}):\n{tail}")
    log.unlink()
    timeout = max(20.0, 3 * baseline[0][1] + 10)
    logger.info("%s: %d mutants; tests take %.1f s unmutated", target.name, len(found), baseline[0][1])
    jobs = [Job(target.module, path, mutated_source(source, m), target.tests) for m in found]
    verdicts: dict[int, str] = {}
    started = time.monotonic()

    def done(index: int, verdict: str, seconds: float) -> None:
        verdicts[index] = verdict
        if verdict == SURVIVED:
            logger.info("  survived: %s (line %d)", found[index].key, found[index].line)
        if len(verdicts) % 20 == 0:
            logger.info("  %d/%d done", len(verdicts), len(found))

    run_jobs(jobs, workers, timeout, done)
    equivalent = EQUIVALENT.get(target.module, {})
    keys = {m.key for m in mutants(source)}
    rows = [
        {"key": m.key, "line": m.line, "code": lines[m.line - 1].strip(), "verdict": verdicts[i]}
        for i, m in enumerate(found)
    ]
    return {
        "module": target.module,
        "tests": list(target.tests),
        "guards_data": target.guards_data,
        "partial": only is not None,
        "seconds": round(time.monotonic() - started, 1),
        "baseline_seconds": round(baseline[0][1], 1),
        "mutants": rows,
        "equivalent": {k: v for k, v in equivalent.items() if k in keys},
        "stale_equivalent": sorted(k for k in equivalent if k not in keys),
        "killed": sum(v in (KILLED, TIMEOUT) for v in verdicts.values()),
    }


def _run_planted(workers: int) -> bool:
    """Each planted bug alone against its module's tests; True if every one is caught."""
    tests = {t.module: t.tests for t in TARGETS}
    logs = Path(tempfile.mkdtemp(prefix="mutation-planted-"))
    jobs = []
    for i, bug in enumerate(PLANTED):
        path = REPO / (bug.module.replace(".", "/") + ".py")
        jobs.append(Job(bug.module, path, plant(path.read_text(), bug), tests[bug.module], logs / f"{i}.log"))
    caught = {}

    def done(index: int, verdict: str, _seconds: float) -> None:
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", jobs[index].log.read_text(errors="replace"), re.M)
        caught[index] = verdict != SURVIVED
        logger.info("%-8s %s: %s; %s", verdict, PLANTED[index].module, PLANTED[index].what, ", ".join(failed))

    run_jobs(jobs, workers, 600, done)
    shutil.rmtree(logs)
    logger.info("%d of %d planted bugs caught", sum(caught.values()), len(PLANTED))
    return all(caught.values())


def _write(path: Path, text: str) -> None:
    """Whole or not at all: a report stopped halfway would read as a complete one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.mutation", description=__doc__)
    parser.add_argument(
        "--module", action="append", help="a target's name or module (repeatable; default all)"
    )
    parser.add_argument("--only", help="only mutants whose key contains this (a partial run, not reported)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--list", action="store_true", help="print each target's mutant keys and stop")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--planted", action="store_true", help="plant issue 23's twelve bugs, one at a time")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.chdir(REPO)
    targets = _chosen(args.module)
    if args.list:
        for target in targets:
            for m in mutants((REPO / target.path).read_text()):
                print(f"{target.module}\t{m.line}\t{m.key}")
        return 0
    warm_up()
    if args.planted:
        return 0 if _run_planted(args.workers) else 1
    store = args.results / "mutation.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    for target in targets:
        measured = _measure(target, args.workers, args.only)
        if args.only:
            for row in measured["mutants"]:
                logger.info("%s  %s (line %d)", row["verdict"], row["key"], row["line"])
            continue
        results[target.name] = measured  # saved after each module: a long run stopped keeps what it measured
        order = [t.name for t in TARGETS]
        results = dict(sorted(results.items(), key=lambda item: order.index(item[0])))
        args.results.mkdir(parents=True, exist_ok=True)
        _write(store, json.dumps(results, indent=1) + "\n")
        _write(args.results / "mutation.md", render_report(results))
    if not args.only:
        logger.info("wrote %s and %s", store, args.results / "mutation.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
