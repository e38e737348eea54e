"""The prune stage: the plan applied to the model, refit as it goes if the config asks, and, for a
streamed model, each layer written to the checkpoint's shards as soon as it is final.

Three paths, one result: in memory without compensation (``pruning.surgery.apply_plan``), in memory with
the refit pass (``pruning.compensation.refit.prune_with_refit``), and streamed (``prune_and_write``: each
layer read, pruned with the same surgery, written before the next is read, so the saved tensors are
the in-memory path's, bit for bit; docs/streaming.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from pruning.calibration.engine import LayerStore, each_layer
from pruning.checkpoint.save import partial_dir
from pruning.compensation.refit import OBS_SELECTION, prune_with_refit
from pruning.config import PipelineConfig
from pruning.families import adapter_for
from pruning.hooks.context import PipelineContext
from pruning.planning.plan import PruningPlan
from pruning.source.streaming import StreamedLayers, build_skeleton
from pruning.storage.shards import ShardWriter
from pruning.surgery import apply_layer_plan, apply_plan


def prune_heading(config: PipelineConfig, streamed: bool) -> str:
    """The stage's heading in the log: what the pass will do."""
    heading = "Remove the planned structures" + (", layer by layer, writing each layer" if streamed else "")
    if config.compensation.method == "refit":
        heading += (
            f", refitting each block's output projections on the {config.compensation.inputs} model's "
            f"activations (ridge {config.compensation.ridge:g})"
        )
        if config.compensation.selection == OBS_SELECTION:
            heading += ", each block's removals re-chosen by greedy OBS"
    return heading


def prune(
    context: PipelineContext, windows: torch.LongTensor | None, streamed: bool, checkpoint: Path
) -> Path | None:
    """Apply ``context.plan`` to ``context.model`` (the plan becomes what was really removed); returns
    the partial checkpoint directory a streamed run has written the weights to (None in memory)."""
    config = context.config
    store = context.layer_store
    refit = config.compensation.method == "refit"

    def pruning_pass(layers: LayerStore, done: Callable[[nn.Module], None] | None = None) -> None:
        comp, batch_size = config.compensation, config.calibration.batch_size
        context.plan = prune_with_refit(
            context.model,
            context.plan,
            windows,
            batch_size,
            comp.ridge,
            layers,
            done,
            comp.selection,
            comp.obs_steps,
            comp.inputs,
        )

    if streamed:
        weights_dir = partial_dir(checkpoint)
        prune_and_write(
            context.model,
            context.plan,
            store,
            weights_dir,
            config.output.max_shard_bytes,
            pruning_pass if refit else None,
        )
        context.layer_store = store.reading(weights_dir)  # hooks evaluate the pruned layers from there
        return weights_dir
    if refit:
        pruning_pass(store)
    else:
        apply_plan(context.model, context.plan)
    return None


def declared_tensors(
    config: PretrainedConfig, dtype: torch.dtype, plan: PruningPlan
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Name, dtype and shape of every tensor the pruned checkpoint stores, in state-dict order (tied
    copies once): read from a meta skeleton pruned by the plan, so they cannot differ from surgery's."""
    pruned = build_skeleton(config, dtype)
    apply_plan(pruned, plan)
    tied = set(pruned.get_expanded_tied_weights_keys(all_submodels=True))
    return [(n, t.dtype, tuple(t.shape)) for n, t in pruned.state_dict().items() if n not in tied]


def prune_and_write(
    model: nn.Module,
    plan: PruningPlan,
    store: StreamedLayers,
    directory: Path,
    max_shard_bytes: int,
    pruning_pass: Callable[[LayerStore, Callable[[nn.Module], None]], None] | None = None,
) -> None:
    """Prune layer by layer, each written to ``directory``'s shards before the next is read.

    ``pruning_pass(store, write)`` replaces the plain loop with a layer-by-layer pass over ``store`` that
    prunes each layer as it reaches it and calls ``write(layer)`` once the layer is final (compensation:
    ``prune_with_refit``); a layer whose change failed is never written.
    """
    declared = declared_tensors(model.config, store.dtype, plan)
    writer = ShardWriter(directory, declared, max_shard_bytes)
    try:
        names = store.names
        layers = adapter_for(model.config).decoder_layers(model)
        prefixes = tuple(names[id(layer)] + "." for layer in layers)
        state = model.state_dict(keep_vars=True)
        for name, _, _ in declared:
            if not name.startswith(prefixes):
                writer.write(name, _outside_tensor(state, name, store))
        del state

        def write_layer(layer: nn.Module) -> None:
            for key, tensor in layer.state_dict().items():
                writer.write(f"{names[id(layer)]}.{key}", tensor)

        if pruning_pass is None:
            for idx, layer, _ in each_layer(model, store, desc="prune and write"):
                apply_layer_plan(model, plan.layers[idx])
                write_layer(layer)
        else:
            pruning_pass(store, write_layer)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _outside_tensor(state: dict[str, torch.Tensor], name: str, store: StreamedLayers) -> torch.Tensor:
    """A resident tensor as it is in memory, a streamed one read (and cast) from the source."""
    tensor = state.get(name)
    if tensor is not None and not tensor.is_meta:
        return tensor.detach()
    return store.reader.read(name, store.dtype)
