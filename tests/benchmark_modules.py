"""Import a script or package from benchmarks/ (not itself a package) for its tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def load_benchmark(stem: str) -> ModuleType:
    """``benchmarks/<stem>.py`` (or the package ``benchmarks/<stem>/``) as module ``benchmark_<stem>``,
    registered so its dataclasses resolve; benchmarks/ goes on the path, as when a script runs there."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    name = f"benchmark_{stem}"
    if name not in sys.modules:
        package = BENCHMARKS / stem / "__init__.py"
        if package.is_file():
            spec = importlib.util.spec_from_file_location(
                name, package, submodule_search_locations=[str(package.parent)]
            )
        else:
            spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
