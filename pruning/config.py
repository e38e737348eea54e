"""YAML config -> validated, typed ``PipelineConfig``.

The YAML is checked against ``pruning/schemas/config.schema.json`` before anything is loaded, so a
typo fails in milliseconds with one line naming the key path and the rule it broke.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from pruning.errors import UserError
from pruning.reports import load_schema
from pruning.storage.fs import MAX_CONFIG_BYTES, read_text_file_bounded

CONFIG_SCHEMA = "config.schema.json"

# JSON Schema counts 16.0 as an integer; a config must not (torch would fail on it much later).
_STRICT_TYPES = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
)
_ConfigValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=_STRICT_TYPES)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (plain YAML silently keeps the last)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: SafeLoader reports it below
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping",
                node.start_mark,
                f"duplicate key {key!r} (a key may appear once per section)",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


@dataclass(frozen=True)
class ModelConfig:
    path: str
    dtype: str = "float32"
    # accelerate's meaning: cpu, cuda, cuda:N, auto (GPUs, then CPU, then disk), or {module: device|disk}
    device_map: str | dict[str, str | int] = "cpu"
    max_memory: dict[str | int, str] | None = None  # {0: 70GiB, cpu: 100GiB}: what device_map auto may fill
    streaming: str = (
        "auto"  # auto | always | never: read decoder layers one at a time (pruning.source.placement)
    )
    trust_pickle: bool = False

    def max_memory_bytes(self) -> dict[str | int, int] | None:
        """max_memory as accelerate takes it: GPU indices as ints, sizes in bytes."""
        if self.max_memory is None:
            return None
        return {
            int(k) if str(k).isdigit() else str(k): size_in_bytes(str(v)) for k, v in self.max_memory.items()
        }


@dataclass(frozen=True)
class WeightedSource:
    source: str
    weight: float


@dataclass(frozen=True)
class CalibrationConfig:
    source: str = "data/wikitext-2-raw/wiki.valid.raw"
    sources: tuple[
        WeightedSource, ...
    ] = ()  # a mix, instead of ``source`` (pruning.calibration.data.mixed_windows)
    num_samples: int = 64
    seq_len: int = 256
    batch_size: int = 4
    seed: int = 0
    engine: str = "layerwise"  # layerwise | whole_model (pruning.calibration.engine)
    gradient_checkpointing: bool = False  # taylor: recompute activations in the backward to save memory
    fisher_samples: int | None = None  # obs_fisher: windows of the Fisher backward (None: all)

    def mix(self) -> tuple[WeightedSource, ...]:
        """The texts calibration draws from, with their weights (``source`` alone has weight 1)."""
        return self.sources or (WeightedSource(self.source, 1.0),)

    def describe(self) -> str:
        """``wiki.valid.raw`` or ``wiki.valid.raw 0.7 + builtin:python-code 0.3``: for logs."""
        if not self.sources:
            return self.source
        return " + ".join(f"{s.source} {s.weight:g}" for s in self.sources)


@dataclass(frozen=True)
class CompensationConfig:
    method: str = "none"  # none | refit (pruning.compensation.refit)
    ridge: float = 1e-3
    selection: str = "plan"  # plan | obs: which structures each block loses (pruning.compensation.refit)
    obs_steps: int = 128  # greedy OBS (obs, obs_fisher, selection obs): updates per block (compensation.obs)
    inputs: str = "pruned"  # pruned | dense: whose activations the refit fits (pruning.compensation.refit)


@dataclass(frozen=True)
class PruningConfig:
    ratio: float
    ratio_of: str = "total"
    importance: str = "activation"
    protected_layers: tuple[int, ...] = ()
    min_kv_groups: int = 0
    min_channels: int = 0
    uniform: bool = False  # one size for every layer: a stock config (pruning.planning.rounding)
    multiple_of: int = 1
    heads_multiple_of: int = 1


@dataclass(frozen=True)
class OutputConfig:
    dir: str
    overwrite: bool = False
    max_shard_size: str = "5GB"  # safetensors shards of at most this size (a bigger tensor gets its own)

    @property
    def max_shard_bytes(self) -> int:
        return size_in_bytes(self.max_shard_size)


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS.update({"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40})


def size_in_bytes(text: str) -> int:
    """``5GB`` -> 5 * 10**9, ``512MiB`` -> 512 * 2**20 (decimal and binary units, capital B for bytes;
    the int is what is handed to transformers, so its own reading of the text never applies)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a size like 5GB or 512MiB")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return size


@dataclass(frozen=True)
class HookConfig:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    on_error: str = "raise"


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    model: ModelConfig
    calibration: CalibrationConfig
    pruning: PruningConfig
    output: OutputConfig
    hooks: tuple[HookConfig, ...] = ()
    compensation: CompensationConfig = CompensationConfig()
    source_file: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, as YAML would spell it (recorded in run.json)."""
        data = asdict(self)
        data.pop("source_file")
        data["pruning"]["protected_layers"] = list(self.pruning.protected_layers)
        if data["model"]["max_memory"] is None:
            del data["model"]["max_memory"]  # absent, as YAML spells "no cap"
        data["hooks"] = [asdict(h) for h in self.hooks]
        calibration = data["calibration"]
        if self.calibration.sources:  # one of the two keys, as YAML may spell it
            del calibration["source"]
            calibration["sources"] = [asdict(s) for s in self.calibration.sources]
        else:
            del calibration["sources"]
        return data


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override (``key.path=value``, values parsed as YAML), validate and type a config file."""
    path = Path(path)
    raw = _read_yaml(path)
    for override in overrides or []:
        _apply_override(raw, override)
        _replace_the_other_text_key(raw, override)
    _check_renamed(raw, source=str(path))
    validate_config(raw, source=str(path))
    return _typed(raw, path)


def _check_renamed(raw: dict[str, Any], source: str) -> None:
    """Keys that changed meaning get a line saying what replaced them, not "unexpected property"."""
    model = raw.get("model")
    if isinstance(model, dict) and "device" in model:
        raise UserError(
            f"{source}: model.device was renamed model.device_map, where auto means what accelerate means "
            "(fill the GPUs, then the CPU, then stream from disk); write cpu, cuda, cuda:N or auto"
        )


def _read_yaml(path: Path) -> dict[str, Any]:
    text = read_text_file_bounded(path, what="config file", limit=MAX_CONFIG_BYTES)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except RecursionError as e:
        raise UserError(f"{path}: not valid YAML: nested too deeply") from e
    except ValueError as e:  # int() refusing a number of more than 4300 digits
        raise UserError(f"{path}: not valid YAML: {str(e)[:200]}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: the config must be a YAML mapping (got {type(data).__name__})")
    return data


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {override!r}: expected key.path=value")
    try:
        parsed = yaml.load(value, Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: a 5000-digit integer
        raise UserError(f"--set {override[:200]!r}: value is not valid YAML") from e
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = parsed


def _replace_the_other_text_key(raw: dict[str, Any], override: str) -> None:
    """``--set calibration.source=X`` on a config with a mix (or ``sources`` on one with a single
    text) replaces what the file says, rather than failing as two keys given at once."""
    key = override.partition("=")[0].strip()
    other = {"calibration.source": "sources", "calibration.sources": "source"}.get(key)
    calibration = raw.get("calibration")
    if other and isinstance(calibration, dict):
        calibration.pop(other, None)


def dotted(path: Any) -> str:
    """``deque(['pruning', 'ratio'])`` -> ``pruning.ratio``; list indices as ``hooks[0]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def config_schema() -> dict[str, Any]:
    """The config's JSON Schema, with the registered criteria as the names ``pruning.importance`` takes
    (the registry is their one source: a new criterion needs no schema edit)."""
    from pruning.criteria.registry import CRITERIA

    schema = copy.deepcopy(load_schema(CONFIG_SCHEMA))
    schema["properties"]["pruning"]["properties"]["importance"]["enum"] = CRITERIA.names()
    return schema


# A config holds a few dozen values; YAML anchors and aliases can make a 1 KB file stand for billions,
# which validation would walk and its error message would print whole.
MAX_CONFIG_VALUES = 100_000
MAX_MESSAGE_CHARS = 300  # of a schema error's own words (it quotes the offending value)


def validate_config(raw: Any, source: str = "config") -> None:
    """One UserError naming the key path and the rule, for the most specific schema violation.

    Bounded in time and size whatever the input: a config that expands to more than
    ``MAX_CONFIG_VALUES`` values is refused before it is walked, and a message quotes at most
    ``MAX_MESSAGE_CHARS`` characters.
    """
    size = expanded_size(raw)
    if size > MAX_CONFIG_VALUES:
        raise UserError(
            f"{source}: the config expands to {size:,} values (YAML anchors and aliases?); "
            f"a config has at most {MAX_CONFIG_VALUES:,}"
        )
    validator = _ConfigValidator(config_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(raw))
    if error is not None:
        message = error.message
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + f"... ({len(error.message):,} characters)"
        raise UserError(f"{source}: {dotted(error.absolute_path)}: {message}")
    bad_at = _find_not_finite(raw, [])
    if bad_at is not None:  # NaN compares false with every bound, so the schema's minimum lets it through
        raise UserError(f"{source}: {dotted(bad_at)}: must be a finite number (nan and inf are not)")


def expanded_size(value: Any, seen: dict[int, int] | None = None) -> int:
    """Values in ``value`` counted as if every shared (aliased) part were a copy, in time linear in the
    distinct parts: what walking it would cost."""
    seen = {} if seen is None else seen
    if not isinstance(value, dict | list):
        return 1
    if id(value) not in seen:
        children = value.values() if isinstance(value, dict) else value
        seen[id(value)] = 1 + sum(expanded_size(child, seen) for child in children)
    return seen[id(value)]


def _find_not_finite(value: Any, path: list[Any]) -> list[Any] | None:
    """The first NaN or infinity: no setting has a use for one, and each would pass the schema's bounds
    (NaN) or overflow a sum (a calibration weight of .inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found = _find_not_finite(child, [*path, key])
        if found is not None:
            return found
    return None


def _check_switches(raw: dict[str, Any], importance: str, path: Path) -> None:
    """A switch only some criteria read (``calibration.gradient_checkpointing``; not ``fisher_samples``,
    which the default config sets) is refused when the criterion does not take it, not ignored."""
    from pruning.criteria.registry import CRITERIA, SWITCHES

    options = CRITERIA.options(importance)
    for key in SWITCHES:
        section, _, option = key.partition(".")
        if (raw.get(section) or {}).get(option) and option not in options:
            takers = CRITERIA.takers(option)
            raise UserError(
                f"{path}: {key} applies only to the criteria that take it ({', '.join(takers)}); "
                f"pruning.importance is {importance}"
            )


def _typed(raw: dict[str, Any], path: Path) -> PipelineConfig:
    name = raw.get("name") or path.stem
    pruning = dict(raw["pruning"])
    pruning["protected_layers"] = tuple(pruning.get("protected_layers", ()))
    output = {"dir": str(Path("results") / name), **raw.get("output", {})}
    if "max_shard_size" in output:
        try:
            size_in_bytes(output["max_shard_size"])
        except ValueError as e:
            raise UserError(f"{path}: output.max_shard_size: {e}") from e
    calibration = dict(raw.get("calibration", {}))
    if "source" in calibration and "sources" in calibration:
        raise UserError(f"{path}: calibration: give source (one text) or sources (a mix), not both")
    calibration["sources"] = tuple(WeightedSource(**item) for item in calibration.get("sources", ()))
    _check_switches(raw, pruning.get("importance", PruningConfig.importance), path)
    windows = calibration.get("num_samples", CalibrationConfig.num_samples)
    if (calibration.get("fisher_samples") or 0) > windows:
        raise UserError(
            f"{path}: calibration.fisher_samples is more than calibration.num_samples ({windows})"
        )
    if pruning.get("uniform") and pruning["protected_layers"]:
        raise UserError(
            f"{path}: pruning.uniform gives every layer one size, so protected_layers "
            f"{list(pruning['protected_layers'])} cannot stay whole; drop one of them"
        )
    compensation = raw.get("compensation", {})
    method = compensation.get("method", "none")
    for key, default in (("inputs", "pruned"), ("selection", "plan")):  # settings of the refit pass
        if compensation.get(key, default) != default and method != "refit":
            raise UserError(
                f"{path}: compensation.{key}: {compensation[key]} is a setting of the refit pass, which "
                f"runs only with compensation.method: refit (it is {method})"
            )
    for key, size in (raw["model"].get("max_memory") or {}).items():
        try:
            size_in_bytes(str(size))
        except ValueError as e:
            raise UserError(f"{path}: model.max_memory.{key}: {e}") from e
    hooks = tuple(HookConfig(name=h) if isinstance(h, str) else HookConfig(**h) for h in raw.get("hooks", []))
    return PipelineConfig(
        name=name,
        model=ModelConfig(**raw["model"]),
        calibration=CalibrationConfig(**calibration),
        compensation=CompensationConfig(**raw.get("compensation", {})),
        pruning=PruningConfig(**pruning),
        output=OutputConfig(**output),
        hooks=hooks,
        source_file=str(path),
    )
