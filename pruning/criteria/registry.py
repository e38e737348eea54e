"""Criterion names -> classes: the built-ins, and third-party criteria from entry points.

This module imports the criteria and none of them imports it: adding a criterion is one file with one
``Criterion`` subclass, plus one line in ``BUILTIN`` (docs/architecture.md). Everything else asks the
registry for a criterion's facts (the class attributes of ``pruning.criteria.base.Criterion``) and
options (its dataclass fields), never its name: the config schema's list of names, the config checks,
``--dry-run`` and the pipeline. A package adds a criterion by declaring an entry point in the group
``pruning.criteria`` whose name is the criterion's name and whose value is ``module:Class``; it is
imported only when a config names it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from pruning.criteria.activation import ActivationCriterion
from pruning.criteria.base import Criterion
from pruning.criteria.magnitude import MagnitudeCriterion
from pruning.criteria.obs import ObsCriterion
from pruning.criteria.obs_fisher import FisherObsCriterion
from pruning.criteria.refit_error import RefitErrorCriterion
from pruning.criteria.taylor import TaylorCriterion
from pruning.errors import UserError
from pruning.plugins import load_plugin, plugin_names

ENTRY_POINT_GROUP = "pruning.criteria"
BUILTIN: tuple[type[Criterion], ...] = (
    ActivationCriterion,
    TaylorCriterion,
    MagnitudeCriterion,
    RefitErrorCriterion,
    ObsCriterion,
    FisherObsCriterion,
)
# Config keys whose values a criterion takes as the option of the key's last name, if it declares one.
CONFIG_OPTIONS = (
    "calibration.batch_size",
    "calibration.engine",
    "calibration.gradient_checkpointing",
    "calibration.fisher_samples",
    "compensation.ridge",
    "compensation.obs_steps",
)
# Of those, the switches that do something only for a criterion that takes them: set for any other, the
# config is refused rather than silently ignored.
SWITCHES = ("calibration.gradient_checkpointing",)


class CriterionRegistry:
    """Criterion name -> class. Built-ins are registered explicitly; plugins load when named."""

    def __init__(self, criteria: Iterable[type[Criterion]] = ()) -> None:
        self._classes: dict[str, type[Criterion]] = {}
        for criterion in criteria:
            self.register(criterion)

    def register(self, criterion: type[Criterion]) -> None:
        if not (isinstance(criterion, type) and issubclass(criterion, Criterion)) or not criterion.name:
            raise TypeError(f"{criterion!r} is not a Criterion subclass with a name")
        if not dataclasses.is_dataclass(criterion):
            raise TypeError(f"{criterion.__name__} must be a dataclass (its fields are its options)")
        if criterion.name in self._classes:
            raise ValueError(f"criterion {criterion.name!r} is already registered")
        self._classes[criterion.name] = criterion

    def unregister(self, name: str) -> None:
        del self._classes[name]

    def names(self) -> list[str]:
        """Every criterion a config may name, plugins included (named, not imported)."""
        plugins = plugin_names(ENTRY_POINT_GROUP)
        return sorted(set(self._classes) | plugins)

    def get(self, name: str) -> type[Criterion]:
        """The class of a criterion, loading a plugin that declares it; a UserError for any other name."""
        if name not in self._classes:
            self._load_plugin(name)
        if name not in self._classes:
            raise UserError(
                f"unknown importance criterion {name!r}: known criteria are {', '.join(self.names())}"
            )
        return self._classes[name]

    def takers(self, option: str) -> list[str]:
        """The registered criteria that take ``option`` (plugins not yet loaded are not asked)."""
        return sorted(name for name, cls in self._classes.items() if option in _fields(cls))

    def options(self, name: str) -> dict[str, Any]:
        """The options a criterion takes, with their types: its dataclass fields."""
        return _fields(self.get(name))

    def build(self, name: str, **options: Any) -> Criterion:
        """A criterion with these options; one it does not take is the caller's error."""
        cls = self.get(name)
        unknown = sorted(set(options) - set(self.options(name)))
        if unknown:
            raise UserError(
                f"importance criterion {name!r}: bad options {unknown}: it takes {sorted(self.options(name))}"
            )
        return cls(**options)

    def build_offered(self, name: str, offered: Mapping[str, Any]) -> Criterion:
        """A criterion with those of the ``offered`` options it takes (a run offers all it has)."""
        taken = self.options(name)
        return self.build(name, **{key: value for key, value in offered.items() if key in taken})

    def _load_plugin(self, name: str) -> None:
        found = load_plugin(ENTRY_POINT_GROUP, name, "criterion")
        if found is None:
            return
        criterion, where = found
        if not (isinstance(criterion, type) and issubclass(criterion, Criterion)) or criterion.name != name:
            raise UserError(f"criterion plugin {name!r} ({where}) is not a Criterion named {name!r}")
        try:
            self.register(criterion)
        except TypeError as e:
            raise UserError(f"criterion plugin {name!r} ({where}): {e}") from e


def _fields(cls: type[Criterion]) -> dict[str, Any]:
    return {f.name: f.type for f in dataclasses.fields(cls)}


CRITERIA = CriterionRegistry(BUILTIN)


def get_criterion(name: str, **options: Any) -> Criterion:
    """A criterion instance by registered name; ``options`` (e.g. batch_size) go to its constructor."""
    return CRITERIA.build(name, **options)


def config_options(config: Any) -> dict[str, Any]:
    """The values of ``CONFIG_OPTIONS`` in a typed config, by option name."""
    options = {}
    for key in CONFIG_OPTIONS:
        section, _, option = key.partition(".")
        options[option] = getattr(getattr(config, section), option)
    return options
