"""Where a benchmark ran: the machine, and the versions of what it ran (with the git revision).

Every table under ``benchmarks/results/`` carries both in its header, so a figure can be traced to the
code and hardware that produced it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from pruning.pipeline.run_record import git_revision, package_versions

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """CPU model, cores (all, and those this process may use), RAM and GPU."""
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram"] = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    except ImportError:
        pass
    return info


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Python's and each package's version, and the checkout's git revision when there is one."""
    found = package_versions(packages)
    revision = git_revision(ROOT)
    if revision:
        found["git"] = revision
    return found
