"""Run a module's own tests against each of its mutants, in forked children of one warm process.

Importing torch and transformers takes about 5 s here, longer than most test files take to run, so the
parent imports them once and forks a child per mutant. The parent never imports ``pruning``: each child
imports it fresh, with the mutated module's source served by an import hook (no file is changed, so a
worktree is never left mutated, and several children run side by side). A mutant is killed when its
tests fail (``pytest -x`` stops at the first failure), cannot be collected, crash or run past the
timeout; it survives when they pass.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

KILLED, SURVIVED, TIMEOUT = "killed", "survived", "timeout"


@dataclass(frozen=True)
class Job:
    """One child: the module's source (mutated or not) and the tests to run against it."""

    module: str  # dotted name, e.g. pruning.rundir.staging
    path: Path
    source: str
    tests: tuple[str, ...]
    log: Path | None = None  # where pytest's output goes (nowhere by default)


def warm_up() -> None:
    """Import what every test imports, once, before any fork; ``pruning`` itself stays unimported."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per child: children run side by side
    import jsonschema  # noqa: F401
    import pytest  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401  (the lazy modeling import is the slow one)

    torch.set_num_threads(1)
    if any(name == "pruning" or name.startswith("pruning.") for name in sys.modules):
        raise RuntimeError("the mutation runner's parent must not import pruning")


class _MutantFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves one module from a string instead of its file."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 (importlib's signature)
        if fullname != self.job.module:
            return None
        return importlib.util.spec_from_file_location(fullname, self.job.path, loader=self)

    def create_module(self, spec):  # noqa: ANN001
        return None

    def exec_module(self, module) -> None:  # noqa: ANN001
        exec(compile(self.job.source, str(self.job.path), "exec"), module.__dict__)


def _child(job: Job, basetemp: Path) -> None:
    """In the forked child: run the tests against the job's source, exit with pytest's code."""
    code = 99
    try:
        os.setsid()  # its own process group: a timeout kills whatever the tests started too
        # As a fresh interpreter has them, whatever the parent inherited (a job started with ``&`` ignores
        # SIGINT, and tests of Ctrl-C handling would then fail on the unmutated module).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        output = os.open(job.log or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(output, 1)
        os.dup2(output, 2)
        import pytest

        sys.dont_write_bytecode = True
        sys.meta_path.insert(0, _MutantFinder(job))
        args = [*job.tests, "-x", "-q", "-p", "no:cacheprovider", f"--basetemp={basetemp}"]
        code = int(pytest.main(args))
    finally:
        os._exit(code)


def verdict(exit_code: int | None) -> str:
    """pytest's exit code as a verdict (None: the child ran past the timeout)."""
    if exit_code is None:
        return TIMEOUT
    return SURVIVED if exit_code == 0 else KILLED


def run_jobs(
    jobs: Sequence[Job],
    workers: int,
    timeout: float,
    on_done: Callable[[int, str, float], None],
) -> None:
    """Run every job, ``workers`` at a time; ``on_done(index, verdict, seconds)`` as each ends."""
    pending = list(enumerate(jobs))
    running: dict[int, tuple[int, float, Path]] = {}  # pid -> (job index, start, basetemp)
    scratch = Path(tempfile.mkdtemp(prefix="mutation-"))
    try:
        while pending or running:
            while pending and len(running) < workers:
                index, job = pending.pop(0)
                basetemp = scratch / str(index)
                pid = os.fork()
                if pid == 0:
                    _child(job, basetemp)
                running[pid] = (index, time.monotonic(), basetemp)
            # Peek without reaping: while the child is a zombie its pid (the id of its process group)
            # cannot be reused, so killing that group below reaches only what the tests started.
            ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if ended is None:
                now = time.monotonic()
                for child, (index, start, basetemp) in list(running.items()):
                    if now - start > timeout:
                        _kill_group(child)
                        os.waitpid(child, 0)
                        del running[child]
                        shutil.rmtree(basetemp, ignore_errors=True)
                        on_done(index, verdict(None), now - start)
                time.sleep(0.05)
                continue
            pid = ended.si_pid
            index, start, basetemp = running.pop(pid)
            _kill_group(pid)  # anything the tests left running
            _, status = os.waitpid(pid, 0)
            shutil.rmtree(basetemp, ignore_errors=True)
            code = os.waitstatus_to_exitcode(status)
            on_done(index, verdict(code if code >= 0 else 128 - code), time.monotonic() - start)
    finally:
        for pid in running:
            _kill_group(pid)
        shutil.rmtree(scratch, ignore_errors=True)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
