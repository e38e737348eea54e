"""Models placed part by part (``pruning.source.placement``), streamed parts read only when a pass
reaches them.

The model is the stock class built on the meta device (rotary tables and other computed buffers built
for real); resident parts get their weights from the source's safetensors at load, streamed ones stay
on meta until ``StreamedLayers.load`` reads them and go back to meta at ``unload``. A streamed run holds
one decoder layer's weights at a time, plus the embeddings while the first layer's inputs are captured.

``prune_and_write`` is the pruning pass of such a model: each layer is read, pruned with the same
surgery as the in-memory path (``pruning.surgery.apply_layer_plan``) and written to the checkpoint's
shards before the next is read, so the saved tensors are the in-memory path's, bit for bit.
Design and proof: docs/streaming.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from pruning.calibration.engine import ResidentLayers
from pruning.errors import UserError
from pruning.families import adapter_for
from pruning.source.placement import DISK, Placement
from pruning.storage.shards import ShardReader

logger = logging.getLogger(__name__)


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The stock causal LM for ``config`` with its parameters on meta, in ``dtype``, in eval mode."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model.eval()


def to_meta(module: nn.Module) -> None:
    """Drop the module's parameters (shapes kept, on meta); computed buffers stay."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and not param.is_meta:
                sub._parameters[name] = nn.Parameter(
                    torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                )


def release_freed_memory() -> None:
    """Hand memory freed by the C allocator back to the system.

    A layer's tensors are tens of MB each; glibc serves such sizes from its heap once its adaptive mmap
    threshold has grown, and keeps the freed heap pages. Layer after layer that grows resident memory
    by about half a layer each time (measured: 1.1B model, 22 layers, 0.34 -> 1.72 GiB); trimming after
    each layer keeps it flat. Elsewhere than glibc this does nothing.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> object:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return object()


def read_into(module: nn.Module, prefix: str, reader: ShardReader, dtype: torch.dtype, device: str) -> None:
    """Give ``module`` (named ``prefix`` in the model) its stored tensors, cast as ``from_pretrained``
    casts them."""
    base = f"{prefix}." if prefix else ""
    for name, param in list(module.named_parameters()):
        tensor = reader.read(base + name, dtype, device)
        if tensor.shape != param.shape:
            stored, needed = list(tensor.shape), list(param.shape)
            raise UserError(f"{base + name} is stored as {stored}; the model's config needs {needed}")
        owner, _, attr = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        sub._parameters[attr] = nn.Parameter(tensor, requires_grad=param.requires_grad)


class StreamedLayers:
    """The engine's ``LayerStore`` for a placed model: a part on ``disk`` is read when reached."""

    def __init__(self, model: nn.Module, reader: ShardReader, placement: Placement, dtype: torch.dtype):
        self.model, self.reader, self.placement, self.dtype = model, reader, placement, dtype
        self.names = {id(module): name for name, module in model.named_modules()}
        # before the first layer: the embeddings (capture stops at the last layer); after it: the rest
        embeddings = self.names[id(model.get_input_embeddings())]
        layer_names = {self.names[id(layer)] for layer in adapter_for(model.config).decoder_layers(model)}
        self.before = [embeddings] if placement.parts.get(embeddings) == DISK else []
        self.after = [
            name
            for name, device in placement.parts.items()
            if device == DISK and name != embeddings and name not in layer_names
        ]

    def reading(self, directory: Path) -> StreamedLayers:
        """The same placement over the checkpoint in ``directory`` (the pruned model a streamed run
        has written), for the model as it is now (pruned shapes)."""
        from pruning.storage.weight_files import find_weight_files

        return StreamedLayers(
            self.model, ShardReader(find_weight_files(directory)), self.placement, self.dtype
        )

    def _streamed(self, name: str) -> bool:
        return self.placement.parts.get(name) == DISK

    @contextlib.contextmanager
    def outside_layers(self, head: bool = False) -> Iterator[None]:
        parts = self.before + (self.after if head else [])
        for name in parts:
            read_into(self.model.get_submodule(name), name, self.reader, self.dtype, self.placement.compute)
        self.model.tie_weights()  # a tied head shares the new parameter (counts stay those of the model)
        try:
            yield
        finally:
            for name in parts:
                to_meta(self.model.get_submodule(name))
            self.model.tie_weights()

    def load(self, layer_idx: int, layer: nn.Module) -> torch.device:
        name = self.names[id(layer)]
        if self._streamed(name):
            read_into(layer, name, self.reader, self.dtype, self.placement.compute)
            return torch.device(self.placement.compute)
        return torch.device(self.placement.parts[name])

    def unload(self, layer_idx: int, layer: nn.Module) -> None:
        if self._streamed(self.names[id(layer)]):
            to_meta(layer)
            release_freed_memory()


def load_placed(
    model: nn.Module, reader: ShardReader, placement: Placement, dtype: torch.dtype
) -> tuple[nn.Module, StreamedLayers | ResidentLayers]:
    """Read the resident parts of a skeleton (``build_skeleton``) onto their devices; streamed parts
    stay on meta, and the store returned reads them when a pass reaches them."""
    for name, device in placement.parts.items():
        if device != DISK:
            read_into(model.get_submodule(name), name, reader, dtype, device)
    model.tie_weights()
    if not placement.streamed and len(placement.devices) > 1:
        _attach_device_hooks(model, placement)
    else:
        _move_buffers(model, placement.compute)
    store = StreamedLayers(model, reader, placement, dtype) if placement.streamed else ResidentLayers()
    return model, store


def _attach_device_hooks(model: nn.Module, placement: Placement) -> None:
    """accelerate's hooks that carry activations to each part's device, so whole-model forwards and
    backwards run across devices. Not ``dispatch_model``: with a GPU in the map it treats ``cpu`` as
    offload (weights on meta, computed on the GPU), and a part must compute where its weights are."""
    from accelerate.hooks import attach_align_device_hook_on_blocks

    execution = _full_map(model, placement)
    attach_align_device_hook_on_blocks(
        model,
        execution_device={name: torch.device(device) for name, device in execution.items()},
        offload=dict.fromkeys(execution, False),
        skip_keys="past_key_values",
    )


def _full_map(model: nn.Module, placement: Placement) -> dict[str, str]:
    """The placement plus the modules outside every part: buffer holders (rotary tables) go with the
    first part, a tied head with the weights it shares. Keys never overlap (accelerate would move a
    whole subtree to one device)."""
    full = dict(placement.parts)
    inside = tuple(name + "." for name in placement.parts)
    for name, module in model.named_modules():
        if not name or name in full or name.startswith(inside):
            continue
        own = next(iter(module.parameters(recurse=False)), None)
        if own is not None:
            full[name] = str(own.device)
        elif module._buffers:
            full[name] = placement.devices[0]
    return full


def _move_buffers(model: nn.Module, device: str) -> None:
    """Computed buffers (rotary tables) go where the layers compute."""
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and not buffer.is_meta:
                module._buffers[name] = buffer.to(device)
