"""Where each part of the model lives during a run: a device, or ``disk`` (streamed).

A *part* is placed whole: each decoder layer, and each module outside the layers that holds
parameters (embeddings, final norm, head). ``model.device_map`` means what accelerate means by it:

- ``cpu``, ``cuda``, ``cuda:N``: every part there;
- ``auto``: accelerate's ``infer_auto_device_map`` fills the GPUs, then the CPU (``model.max_memory``
  caps each), and leaves the rest on ``disk``; without a GPU it is ``cpu``;
- a map of module names (a decoder layer or larger; ``""`` is the whole model) to ``cpu``,
  ``cuda:N``, a GPU index or ``disk``, matched by longest prefix.

A part on ``disk`` is read from the source's safetensors shards when the run reaches it and dropped
after (``pruning.source.streaming``); the source files serve as the offload store, as accelerate uses
safetensors sources, so no offload folder is written. ``model.streaming`` decides whether a map that
fits nowhere streams: ``auto`` streams every part when the weights exceed the room a single-device map
has (70% of the available RAM, 90% of a GPU's free memory: the rest is for activations and the pruned
copies), ``always`` streams every part, ``never`` refuses a map with ``disk`` in it. Why a ``cpu``
part computes on the CPU (unlike accelerate's offload): docs/streaming.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pruning.config import ModelConfig
from pruning.errors import UserError
from pruning.families import adapter_for

logger = logging.getLogger(__name__)

DISK = "disk"
CPU_SHARE = 0.7  # of the available RAM a single-device CPU map may fill before the model is streamed
GPU_SHARE = 0.9  # of a GPU's free memory


@dataclass(frozen=True)
class Placement:
    """Device (or ``disk``) per part, and where streamed parts compute."""

    parts: dict[str, str]
    compute: str
    reason: str  # one line for the log: why this placement

    @property
    def streamed(self) -> bool:
        return DISK in self.parts.values()

    @property
    def devices(self) -> list[str]:
        """The devices resident parts occupy, in order of first use."""
        return list(dict.fromkeys(d for d in self.parts.values() if d != DISK))


def part_names(model: nn.Module) -> list[str]:
    """Decoder layers and the parameter-holding modules outside them, in the model's order."""
    layers = {id(layer) for layer in adapter_for(model.config).decoder_layers(model)}
    names: list[str] = []
    seen: set[int] = set()  # a tied head shares the embeddings' parameter: it goes with them
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=id(module) in layers) if id(p) not in seen]
        if id(module) in layers or own:
            seen.update(id(p) for p in own)
            names.append(name)
    return names


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter (tied ones once) in its dtype: what holding the model costs."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def resolve_placement(cfg: ModelConfig, skeleton: nn.Module) -> Placement:
    """The placement ``cfg`` asks for, for a meta-device skeleton in the run's dtype."""
    names = part_names(skeleton)
    size = weight_bytes(skeleton)
    device_map = cfg.device_map
    if isinstance(device_map, dict):
        parts = _from_map(device_map, names, {name for name, _ in skeleton.named_modules()})
        placement = Placement(parts, _first_device(parts), "model.device_map")
    elif device_map == "auto" and torch.cuda.is_available():
        placement = _auto(cfg, skeleton, names)
    else:
        device = single_device(device_map)
        stream, why = _fits(cfg, device, size)
        parts = dict.fromkeys(names, DISK if stream else device)
        placement = Placement(parts, device, f"model.device_map {device_map}: {why}")
    if cfg.streaming == "always":
        placement = Placement(dict.fromkeys(names, DISK), placement.compute, "model.streaming always")
    if cfg.streaming == "never" and placement.streamed:
        first = next(name for name, d in placement.parts.items() if d == DISK)
        raise UserError(
            f"model.streaming is never, but {placement.reason} puts {first} on disk; give it more "
            "max_memory or let it stream (streaming: auto)"
        )
    return placement


def stream_decision(cfg: ModelConfig, size: int) -> str:
    """In words, whether a model of ``size`` weight bytes would be streamed here (for ``--dry-run``)."""
    device_map = cfg.device_map
    if cfg.streaming == "always":
        return "streamed layer by layer (model.streaming always)"
    if isinstance(device_map, dict) or (device_map == "auto" and torch.cuda.is_available()):
        return "parts placed by model.device_map at load (those on disk are streamed)"
    stream, why = _fits(cfg, single_device(device_map), size)
    return f"streamed layer by layer: {why}" if stream else f"held in memory: {why}"


def single_device(device_map: str) -> str:
    """The device a one-device map names (``auto`` without a GPU is the CPU)."""
    return pick_device("cpu" if device_map == "auto" else device_map)


def _fits(cfg: ModelConfig, device: str, size: int) -> tuple[bool, str]:
    """(whether ``model.streaming`` streams a model of ``size`` bytes on ``device``, why in words)."""
    room = _room(device)
    weights = f"the weights ({size / 2**30:.2f} GiB)"
    if size <= room:
        return False, f"{weights} fit the {room / 2**30:.1f} GiB of room on {device}"
    if cfg.streaming == "never":
        return (
            False,
            f"{weights} exceed the {room / 2**30:.1f} GiB of room on {device}; model.streaming never",
        )
    return (
        True,
        f"{weights} exceed the {room / 2**30:.1f} GiB of room on {device}, so every layer is streamed",
    )


def pick_device(name: str) -> str:
    """A device accelerate and torch both understand; a GPU that is not there fails now."""
    if name == "cuda":
        name = "cuda:0"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"model.device_map: {name!r} requested but no CUDA device is available")
        index = int(name.split(":")[1])
        if index >= torch.cuda.device_count():
            raise UserError(f"model.device_map: {name!r}: only {torch.cuda.device_count()} GPUs are visible")
    elif name != "cpu":
        raise UserError(f"model.device_map: {name!r} is not cpu, cuda, cuda:N, disk or auto")
    return name


def check_devices(cfg: ModelConfig) -> None:
    """The devices ``model.device_map`` names exist (checked before any weight is read)."""
    device_map = cfg.device_map
    if isinstance(device_map, dict):
        for key, value in device_map.items():
            if _device_name(value) == DISK and cfg.streaming == "never":
                what = repr(key) if key else "the model"
                raise UserError(
                    f"model.streaming is never, but model.device_map puts {what} on disk; place it on a "
                    "device or let it stream (streaming: auto)"
                )
    elif device_map != "auto":
        pick_device(device_map)


def _room(device: str) -> int:
    if device == "cpu":
        import psutil

        return int(psutil.virtual_memory().available * CPU_SHARE)
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free * GPU_SHARE)


def _device_name(value: str | int) -> str:
    if isinstance(value, int):
        return pick_device(f"cuda:{value}")
    return value if value == DISK else pick_device(value)


def _from_map(
    device_map: dict[str, Any], names: list[str], modules: set[str] | None = None
) -> dict[str, str]:
    """Each part's device by the longest key that is the part or a module containing it; a user's keys
    (``modules`` given) must name modules of the model, none inside a part."""
    for key in device_map if modules is not None else ():
        inside = next((n for n in names if key.startswith(n + ".")), None)
        if inside is not None:
            raise UserError(f"model.device_map: {key} is inside {inside}, which is placed whole")
        if key not in modules:
            raise UserError(f"model.device_map: no module {key!r} in this model (parts: {names[0]}, ...)")
    parts: dict[str, str] = {}
    for name in names:
        keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        if not keys:
            raise UserError(f'model.device_map places nothing for {name}; add it (or "" for the rest)')
        parts[name] = _device_name(device_map[max(keys, key=len)])
    return parts


def _first_device(parts: dict[str, str]) -> str:
    """Where streamed parts compute: the first GPU the map names, else the CPU."""
    return next((d for d in parts.values() if d.startswith("cuda")), "cpu")


def _auto(cfg: ModelConfig, skeleton: nn.Module, names: list[str]) -> Placement:
    """accelerate's auto map, with room left by default for activations and the pruned copies."""
    from accelerate.utils import infer_auto_device_map

    max_memory = cfg.max_memory_bytes()
    if max_memory is None:
        max_memory = {i: _room(f"cuda:{i}") for i in range(torch.cuda.device_count())}
        max_memory["cpu"] = _room("cpu")
    layers = adapter_for(skeleton.config).decoder_layers(skeleton)
    layer_classes = sorted({type(layer).__name__ for layer in layers})
    inferred = infer_auto_device_map(
        skeleton, max_memory=max_memory, no_split_module_classes=layer_classes, dtype=skeleton.dtype
    )
    parts = _from_map(dict(inferred), names)
    room = ", ".join(f"{device}: {size / 2**30:.1f} GiB" for device, size in max_memory.items())
    return Placement(parts, _first_device(parts), f"model.device_map auto (max_memory {room})")
