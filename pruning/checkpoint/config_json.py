"""What ``save_pruned_model`` writes into ``config.json``, and the modeling code it ships beside it.

Two formats (docs/checkpoint-format.md):

- **stock**, when every layer has the same sizes and no block is gone: ``num_attention_heads``,
  ``num_key_value_heads`` and ``intermediate_size`` are the per-layer sizes and ``head_dim`` is written
  out (stock attention would derive ``hidden_size / num_attention_heads`` otherwise); no layout, no
  ``auto_map``. Anything that loads the family's stock checkpoints loads it unchanged.
- **pruned**, otherwise: the dense top-level sizes, ``pruning_layout`` with each layer's sizes,
  ``pruning_blocks`` (the module of each block and the norms that go when it empties, from the family
  adapter), ``model_type`` ``pruned_<stock type>`` and an ``auto_map`` naming ``modeling_pruned.py``,
  which is written beside it. The type is one transformers does not know, so that without
  ``trust_remote_code`` it stops with its own message about custom code; a known type would make it
  ignore ``auto_map`` and fail later on the first pruned weight's shape.

Dict transformations only, torch-free. Which format a model gets is decided by ``pruning.checkpoint.save``,
which first checks that the stock classes build the model's shapes from the stock format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from pruning.families import KINDS, FamilyAdapter
from pruning.families.layout import LAYOUT_KEY, PRUNED_TYPE_PREFIX, LayerSizes, Layout, stock_model_type

REMOTE_CODE_FILE = "modeling_pruned.py"
BLOCKS_KEY = "pruning_blocks"
AUTO_MAP = {
    "AutoConfig": "modeling_pruned.PrunedConfig",
    "AutoModelForCausalLM": "modeling_pruned.PrunedForCausalLM",
}
PRUNED_ARCHITECTURE = "PrunedForCausalLM"
# The one line of the shipped source that differs between checkpoints: the family it builds.
_BASE_TYPE_LINE = re.compile(r'^BASE_MODEL_TYPE = "llama"', re.MULTILINE)
_PRUNED_FORMAT_KEYS = (LAYOUT_KEY, BLOCKS_KEY, "auto_map")


def uniform_sizes(layout: Layout) -> LayerSizes | None:
    """The sizes every layer has, when all have the same and none lost a whole block; else None."""
    sizes = set(layout)
    if len(sizes) != 1:
        return None
    (only,) = sizes
    return only if only.num_heads and only.intermediate_size else None


def stock_format(config: Mapping[str, Any], sizes: LayerSizes, head_dim: int) -> dict[str, Any]:
    """``config`` as the stock config of a model whose every layer has ``sizes``."""
    out = {key: value for key, value in config.items() if key not in _PRUNED_FORMAT_KEYS}
    out.update(
        model_type=stock_model_type(config["model_type"]),
        num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_kv_heads,
        intermediate_size=sizes.intermediate_size,
        head_dim=head_dim,
    )
    return out


def pruned_format(
    config: Mapping[str, Any], layout: Layout, adapter: FamilyAdapter, head_dim: int
) -> dict[str, Any]:
    """``config`` (dense top-level sizes) with the layout and what the shipped modeling code reads."""
    out = dict(config)
    out.update(
        {
            "model_type": PRUNED_TYPE_PREFIX + stock_model_type(config["model_type"]),
            "architectures": [PRUNED_ARCHITECTURE],
            "auto_map": dict(AUTO_MAP),
            "head_dim": head_dim,  # what every layer keeps; explicit, so no reader has to derive it
            LAYOUT_KEY: layout.to_json(),
            BLOCKS_KEY: blocks_entry(adapter),
        }
    )
    return out


def blocks_entry(adapter: FamilyAdapter) -> dict[str, dict[str, Any]]:
    """Per kind, the block's module in the decoder layer and the norms that go with it when it empties
    (the adapter's ``blocks`` and ``block_norms``, as surgery uses them)."""
    return {
        kind: {"module": adapter.blocks[kind], "norms": list(adapter.block_norms(kind))} for kind in KINDS
    }


def remote_code_source(stock_type: str) -> str:
    """The shipped ``modeling_pruned.py``, set to build the stock family ``stock_type``."""
    template = resources.files("pruning.checkpoint").joinpath(REMOTE_CODE_FILE).read_text(encoding="utf-8")
    source, count = _BASE_TYPE_LINE.subn(f"BASE_MODEL_TYPE = {json.dumps(stock_type)}", template)
    if count != 1:
        raise RuntimeError(f"{REMOTE_CODE_FILE}: expected one BASE_MODEL_TYPE line to set, found {count}")
    return source


def write_remote_code(directory: Path, stock_type: str) -> Path:
    path = directory / REMOTE_CODE_FILE
    path.write_text(remote_code_source(stock_type), encoding="utf-8")
    return path


def loader_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` as this package's own loader builds it: the stock type and the layout, without
    what only the shipped code reads (the stock classes, reshaped by surgery, make the same modules)."""
    out = {key: value for key, value in config.items() if key not in ("auto_map", BLOCKS_KEY)}
    out["model_type"] = stock_model_type(config.get("model_type"))
    return out
