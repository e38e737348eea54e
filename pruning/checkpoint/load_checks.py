"""What ``load_pruned_model`` checks before it builds anything: the values of ``config.json``, and that
the weights hold exactly what those values imply.

The values meet the analysis's own limits (``families.config_limits``, one function for both). Then
every parameter the config (and its ``pruning_layout``) implies must be stored with the shape it
implies, read from the headers alone: the model built is then exactly as large as the files, so a
forged config cannot make the loader allocate what no file holds. The one thing the files cannot
vouch for is the dense model a layout was cut from; the skeleton builds it on ``meta`` and surgery
removes its structures one by one, so their number is bounded here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pruning.errors import UserError
from pruning.families import adapter_for
from pruning.families.config_limits import check_model_config
from pruning.families.layout import LAYOUT_KEY, layout_in
from pruning.families.shape_rules import compare_to_config, first_of
from pruning.storage.weight_files import TensorInfo, WeightFiles, stored_tensors

# KV groups and channels the skeleton may remove from the dense model (about 1.3 microseconds each on
# the CPU): 2.5 times what pruning every structure of Llama-3.1-405B removes (126 layers of 8 groups
# and 53,248 channels). A dense size that no weight vouches for cannot make loading run for hours.
MAX_REMOVED_STRUCTURES = 2**24


def check_config(config_file: Path, config: dict[str, Any]) -> None:
    """The analysis's limits on every value, then what the skeleton will cost to build."""
    adapter = adapter_for(config)
    try:
        check_model_config(config)
    except ValueError as e:
        raise UserError(f"{config_file}: {e}") from e
    layout = layout_in(config)
    if layout is None:
        return
    dense = adapter.dense_sizes(config)
    removed = sum(  # no layer is larger than the dense one: check_model_config saw to it
        dense.num_kv_heads - layer.num_kv_heads + dense.intermediate_size - layer.intermediate_size
        for layer in layout
    )
    if removed > MAX_REMOVED_STRUCTURES:
        raise UserError(
            f"{config_file}: keys 'num_key_value_heads' and 'intermediate_size' ({dense.num_kv_heads:,} and "
            f"{dense.intermediate_size:,}) against its {LAYOUT_KEY} remove {removed:,} structures; at most "
            f"{MAX_REMOVED_STRUCTURES:,}"
        )


def check_against_headers(path: Path, config: dict[str, Any], files: WeightFiles) -> dict[str, TensorInfo]:
    """Every parameter ``config.json`` implies is stored with the shape it implies (headers only, each
    checked against its file); returns the stored tensors.

    Tensors in trusted pickles have no header: with them the stored shapes are compared, and a tensor
    no safetensors file holds is left to the load.
    """
    stored = stored_tensors(files)
    diff = compare_to_config(config, {name: info.shape for name, info in stored.items()})
    if diff.mismatched:
        name, shape, needed = diff.mismatched[0]
        raise UserError(
            f"{path}: {name} is stored as {list(shape)} but config.json (and its {LAYOUT_KEY}) "
            f"needs {list(needed)}; the config disagrees with the weights"
        )
    if diff.missing and not files.pickles:
        raise UserError(
            f"{path}: weights do not match the config's architecture; missing {first_of(diff.missing)}, "
            "which config.json says the model has"
        )
    return stored
