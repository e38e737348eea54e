"""Calibration engine: runs calibration windows through a model for observers that collect statistics.

Two paths give the same statistics (the same kernels on the same inputs, in the same order):

- ``layerwise``: the inputs every decoder layer receives are captured once, with every decoder layer's
  forward replaced by a recorder (so no layer computes and, for a streamed model, none needs its
  weights); then each layer in turn runs on the cached hidden states, batch by batch, with the observers
  watching it, and its outputs become the next layer's inputs. Only one layer works at a time, and only
  its statistics need to be alive: the pass a model larger than memory, and compensation, build on.
- ``whole_model``: one ordinary forward per batch with every layer watched; cheaper when the whole
  model and a batch's activations fit on one device anyway.

Per-layer arguments are recorded per layer, not once: Gemma 2/3 give sliding and global layers different
masks and rotary tables. Criteria are observers (``LayerObserver``) and hold no data loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning.errors import UserError
from pruning.families import adapter_for

logger = logging.getLogger(__name__)

ENGINES = ("layerwise", "whole_model")
Handle = torch.utils.hooks.RemovableHandle


class LayerReplay(Protocol):
    """Runs the layer, as it is now, on every batch of its cached inputs with the observers watching,
    and leaves the cached inputs as they were: how a change measures the layer before and after it
    acts. With ``until``, each batch stops as that submodule is about to compute (after the observers'
    hooks on its input have run): what the observers need, without the rest of the layer."""

    def __call__(self, observers: Sequence[LayerObserver], until: nn.Module | None = None) -> None: ...


# Per submodule of a layer, its output for each batch, in order: what the layer's next run may take
# instead of computing it (a change that already computed them with the changed weights saves the work).
KnownOutputs = dict[nn.Module, list[torch.Tensor]]
# Called with (layer index, layer, replay) just before the layer computes, in a layerwise pass: it may
# change the layer (prune it, refit it), and the next layer then receives what the changed layer outputs.
# It may return the outputs of some submodules, which that run then takes instead of computing them.
LayerChange = Callable[[int, nn.Module, LayerReplay], KnownOutputs | None]


class LayerObserver(Protocol):
    """Something that collects statistics from decoder layers while calibration data runs through them."""

    def watch(self, layer_idx: int, layer: nn.Module) -> list[Handle]:
        """Register hooks on the layer (and its modules) before data runs through it; return them."""
        ...

    def layer_done(self, layer_idx: int, layer: nn.Module) -> None:
        """Every calibration window has been through this layer; its statistics are complete."""
        ...


class LayerStore(Protocol):
    """Where decoder layers' weights are while a pass runs: resident on their devices, or read from the
    checkpoint when the pass reaches them and dropped when it moves on (``pruning.source.streaming``)."""

    def outside_layers(self, head: bool = False) -> contextlib.AbstractContextManager[None]:
        """Inside, the modules that run before the first decoder layer (embeddings) have their weights,
        and with ``head`` also those after the last (final norm, head)."""
        ...

    def load(self, layer_idx: int, layer: nn.Module) -> torch.device:
        """Give the layer its weights on the device it computes on; return that device."""
        ...

    def unload(self, layer_idx: int, layer: nn.Module) -> None:
        """The pass is done with the layer."""
        ...


class ResidentLayers:
    """Every layer already holds its weights; it computes where they are."""

    def outside_layers(self, head: bool = False) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def load(self, layer_idx: int, layer: nn.Module) -> torch.device:
        return next((p.device for p in layer.parameters()), torch.device("cpu"))

    def unload(self, layer_idx: int, layer: nn.Module) -> None:
        pass


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples, lists and dicts) moved to ``device``; everything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the model's device (the first one for a model spread by accelerate)."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def each_layer(
    model: nn.Module, store: LayerStore | None = None, desc: str = "layers"
) -> Iterator[tuple[int, nn.Module, torch.device]]:
    """(index, layer, device) for every decoder layer, each holding its weights only while it is yielded."""
    store = store or ResidentLayers()
    layers = adapter_for(model.config).decoder_layers(model)
    for idx in tqdm(range(len(layers)), desc=desc, unit="layer", disable=len(layers) < 2):
        device = store.load(idx, layers[idx])
        try:
            yield idx, layers[idx], device
        finally:
            store.unload(idx, layers[idx])


@dataclass
class LayerInputs:
    """What each decoder layer receives, per batch: the hidden states entering the first layer (later
    replaced by each layer's outputs as the pass goes on), and every layer's other arguments."""

    hidden: list[torch.Tensor]
    args: list[list[tuple[Any, ...]]] = field(default_factory=list)  # [layer][batch]
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)  # [layer][batch]


class _StopForward(Exception):
    """Raised by the last recorder: nothing after the decoder layers needs to run."""


class _StopLayer(Exception):
    """Raised at a replay's ``until`` module: the rest of the layer need not run."""


def _stop_layer(module: nn.Module, args: Any) -> None:
    raise _StopLayer


def batches(windows: torch.LongTensor | None, batch_size: int) -> list[torch.LongTensor]:
    """Calibration windows split into batches (the last one may be smaller)."""
    if windows is None or windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError("calibration needs windows of shape [num_samples, seq_len]")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1 (got {batch_size})")
    return [windows[start : start + batch_size] for start in range(0, windows.shape[0], batch_size)]


@contextlib.contextmanager
def forwards_replaced(layers: Sequence[nn.Module], forwards: Sequence[Callable[..., Any]]) -> Iterator[None]:
    """Each layer's forward replaced; an instance-level forward (accelerate's device hooks put one
    there) is put back afterwards."""
    own_forward = [vars(layer).get("forward") for layer in layers]
    try:
        for layer, forward in zip(layers, forwards, strict=True):
            layer.forward = forward
        yield
    finally:
        for layer, forward in zip(layers, own_forward, strict=True):
            if forward is None:
                vars(layer).pop("forward", None)  # the class's forward again
            else:
                layer.forward = forward


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, windows: torch.LongTensor, batch_size: int) -> LayerInputs:
    """Run the model with every decoder layer's forward replaced by a recorder that passes its input on.

    Embeddings, rotary tables and masks are computed by the model's own code, so each layer's recorded
    arguments are exactly what the whole-model forward gives it.
    """
    layers = adapter_for(model.config).decoder_layers(model)
    num_layers = len(layers)
    inputs = LayerInputs(hidden=[], args=[[] for _ in layers], kwargs=[[] for _ in layers])

    def recorder(idx: int):
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if idx == 0:
                inputs.hidden.append(hidden_states)
            inputs.args[idx].append(args)
            inputs.kwargs[idx].append(
                {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
            )
            if idx == num_layers - 1:
                raise _StopForward
            return hidden_states

        return forward

    device = model.get_input_embeddings().weight.device  # a streamed model's other weights are meta
    with forwards_replaced(layers, [recorder(idx) for idx in range(num_layers)]):
        for batch in batches(windows, batch_size):
            with contextlib.suppress(_StopForward):
                model(input_ids=batch.to(device), use_cache=False)
    return inputs


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    windows: torch.LongTensor,
    batch_size: int,
    observers: Sequence[LayerObserver],
    change: LayerChange | None = None,
    store: LayerStore | None = None,
) -> list[torch.Tensor]:
    """Each decoder layer in turn, on every batch of the cached inputs, with the observers watching;
    returns the last layer's outputs, per batch.

    ``store`` gives each layer its weights when the pass reaches it (and may take them away after);
    the cached inputs follow each layer to its device. ``change`` runs on each layer before it computes
    (the point where a second pass prunes a layer or refits it on the inputs the already-changed
    earlier layers produce).
    """
    store = store or ResidentLayers()
    layers = adapter_for(model.config).decoder_layers(model)
    with store.outside_layers():
        inputs = capture_layer_inputs(model, windows, batch_size)
    park = _parking_device(inputs.hidden)
    for idx in tqdm(range(len(layers)), desc="calibration, layer by layer", unit="layer"):
        device = store.load(idx, layers[idx])
        try:
            if change is not None:

                def replay(
                    observers: Sequence[LayerObserver],
                    until: nn.Module | None = None,
                    idx: int = idx,
                    device: torch.device = device,
                ) -> None:
                    _watch_layer(idx, layers[idx], device, inputs, observers, keep_inputs=True, until=until)

                known = change(idx, layers[idx], replay)
            else:
                known = None
            _run_layer(idx, layers[idx], device, inputs, observers, park, known)  # ``change`` may replace it
        finally:
            store.unload(idx, layers[idx])
    return inputs.hidden


def _run_layer(
    idx: int,
    layer: nn.Module,
    device: torch.device,
    inputs: LayerInputs,
    observers: Sequence[LayerObserver],
    park: torch.device | None,
    known: KnownOutputs | None = None,
) -> None:
    """One layer on every batch of its cached inputs, watched; its outputs replace them. Submodules
    whose outputs are ``known`` hand those back instead of computing (only when nothing watches the
    layer: an observer's hooks inside such a submodule would not fire)."""
    if known and not observers:
        batch_outputs = [iter(outputs) for outputs in known.values()]
        forwards = [lambda *args, outputs=it, **kwargs: next(outputs) for it in batch_outputs]
        with forwards_replaced(list(known), forwards):
            _watch_layer(idx, layer, device, inputs, observers, keep_inputs=False, park=park)
    else:
        _watch_layer(idx, layer, device, inputs, observers, keep_inputs=False, park=park)
    inputs.args[idx], inputs.kwargs[idx] = [], []  # this layer's masks and tables are no longer needed


def _watch_layer(
    idx: int,
    layer: nn.Module,
    device: torch.device,
    inputs: LayerInputs,
    observers: Sequence[LayerObserver],
    keep_inputs: bool,
    park: torch.device | None = None,
    until: nn.Module | None = None,
) -> None:
    """One layer on every batch of its cached inputs, watched; its outputs replace the inputs unless
    ``keep_inputs``. ``until`` (only with ``keep_inputs``): each batch stops at that submodule's input
    (``LayerReplay``). The observers hear ``layer_done`` at the end."""
    if until is not None and not keep_inputs:
        raise ValueError("a layer stopped part-way has no outputs to pass on")
    handles: list[Handle] = []
    try:
        for observer in observers:
            handles += observer.watch(idx, layer)
        if until is not None:  # registered after the observers', so their hooks see the input first
            handles.append(until.register_forward_pre_hook(_stop_layer))
        for b, hidden in enumerate(inputs.hidden):
            try:
                out = run_batch(layer, hidden, inputs, idx, b, device)
            except _StopLayer:
                continue
            if not keep_inputs:
                inputs.hidden[b] = out if park is None else out.to(park)
    finally:
        for handle in handles:
            handle.remove()
    for observer in observers:
        observer.layer_done(idx, layer)


def run_batch(
    layer: nn.Module, hidden: torch.Tensor, inputs: LayerInputs, idx: int, batch: int, device: torch.device
) -> torch.Tensor:
    """Layer ``idx`` on one batch of ``hidden`` with the arguments the model gave it; its output hidden
    states."""
    args, kwargs = to_device((inputs.args[idx][batch], inputs.kwargs[idx][batch]), device)
    out = layer(hidden.to(device), *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _parking_device(hidden: list[torch.Tensor]) -> torch.device | None:
    """Where hidden states wait between layers: on the accelerator that made them while they take at
    most a quarter of its free memory, else on the CPU (None: wherever each layer leaves them)."""
    if not hidden or hidden[0].device.type != "cuda":
        return None
    size = sum(h.numel() * h.element_size() for h in hidden)
    free, _ = torch.cuda.mem_get_info(hidden[0].device)
    return None if size <= free // 4 else torch.device("cpu")


@torch.no_grad()
def run_whole_model(
    model: nn.Module, windows: torch.LongTensor, batch_size: int, observers: Sequence[LayerObserver]
) -> None:
    """One ordinary forward per batch, every layer watched at once."""
    layers = adapter_for(model.config).decoder_layers(model)
    handles: list[Handle] = []
    try:
        for idx, layer in enumerate(layers):
            for observer in observers:
                handles += observer.watch(idx, layer)
        device = input_device(model)
        for batch in tqdm(batches(windows, batch_size), desc="calibration, whole model", unit="batch"):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for idx, layer in enumerate(layers):
        for observer in observers:
            observer.layer_done(idx, layer)


def calibrate(
    model: nn.Module,
    windows: torch.LongTensor,
    batch_size: int,
    observers: Sequence[LayerObserver],
    engine: str = "layerwise",
    store: LayerStore | None = None,
) -> None:
    """Run the windows through the model for the observers, in eval mode (restored afterwards)."""
    if engine not in ENGINES:
        raise UserError(f"calibration.engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "whole_model" and any(p.is_meta for p in model.parameters()):
        raise UserError(
            "calibration.engine: whole_model needs every weight in memory; this model is streamed "
            "layer by layer (use layerwise)"
        )
    was_training = model.training
    model.eval()
    try:
        if engine == "layerwise":
            run_layerwise(model, windows, batch_size, observers, store=store)
        else:
            run_whole_model(model, windows, batch_size, observers)
    finally:
        model.train(was_training)
