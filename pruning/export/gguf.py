"""Write a saved checkpoint as one GGUF file that llama.cpp runs: per-layer sizes, tokenizer, weights.

Layout. A checkpoint whose layers all have one shape is written as llama.cpp's ``llama`` architecture,
the one its own converter writes for these models. Any other is written as ``deci`` (Nemotron-NAS),
whose graph reads the head, KV-head and feed-forward counts per layer from arrays and skips a block
whose count is 0. Two layouts that graph cannot run as written get an exact stand-in instead
(docs/export.md):

- a removed attention block in layer 0: llama.cpp derives the head width from layer 0's head count,
  so layer 0 gets one KV group whose weights are all zero (the attention then outputs exactly 0);
- a removed MLP block in a layer that keeps attention: the ``deci`` graph skips the whole rest of such
  a layer, attention output included, so the layer gets one MLP channel whose weights are zero;
- a last layer with nothing left: the graph picks the output rows inside the last layer, and skipping
  it aborts llama.cpp, so it gets the zero MLP channel too.

Weights. Query and key rows are permuted from transformers' half-split rotary layout to llama.cpp's
interleaved one (what its converter does for Llama). Norms and biases stay float32; 2-D weights take
the chosen type (``f32``, ``f16``, ``bf16``, ``q8_0``; a row that ``q8_0`` cannot split into blocks
of 32 stays ``f16``). One tensor is read at a time, so memory stays near the largest tensor.

Families: those llama.cpp runs with this graph: Llama, Mistral and Qwen2 (its q/k/v biases are
optional tensors there). Others are refused with the reason. The file appears under its name only
when complete.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from pruning.errors import UserError
from pruning.export.gguf_vocab import read_vocab
from pruning.export.output_path import check_output_path
from pruning.export.tokenizer_json import check_tokenizer_json
from pruning.families import adapter_for
from pruning.families.layout import LayerSizes
from pruning.storage.fs import os_error_reason
from pruning.storage.json_files import read_json_object
from pruning.storage.shards import ShardReader
from pruning.storage.weight_files import find_weight_files

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
ROPE_TYPES = ("default", "linear", "llama3")
REAL, ZERO, NONE = "real", "zero", "none"
# llama.cpp's tensors of each block; the adapter's ``gguf_names`` says which module each one is
ATTENTION_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output")
MLP_TENSORS = (
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)  # a block as written: its weights, a zero stand-in, or absent


@dataclass(frozen=True)
class GgufLayer:
    """One layer as llama.cpp will read it."""

    n_head: int
    n_head_kv: int
    n_ff: int
    attention: str  # REAL / ZERO / NONE
    mlp: str


def gguf_layers(sizes: list[LayerSizes], group_size: int) -> list[GgufLayer]:
    """Per-layer counts for the GGUF, with a zero stand-in where llama.cpp cannot skip a block."""
    out = []
    for idx, s in enumerate(sizes):
        if s.num_kv_heads:
            attention, heads, kv = REAL, s.num_heads, s.num_kv_heads
        elif idx == 0:
            attention, heads, kv = ZERO, group_size, 1
        else:
            attention, heads, kv = NONE, 0, 0
        if s.intermediate_size:
            mlp, ff = REAL, s.intermediate_size
        elif attention != NONE or idx == len(sizes) - 1:
            mlp, ff = ZERO, 1
        else:
            mlp, ff = NONE, 0
        out.append(GgufLayer(heads, kv, ff, attention, mlp))
    return out


def rotary_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head from [first halves..., second halves...] to interleaved pairs (llama.cpp's
    ``rope_type`` NORM reads rotary pairs as neighbours; transformers rotates halves)."""
    head_dim = weight.shape[0] // n_head
    return weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    produce: Callable[[], torch.Tensor]


class _Plan:
    """Every tensor of the GGUF, in order, and how to make it from the checkpoint."""

    def __init__(self, reader: ShardReader, qtype: gguf.GGMLQuantizationType) -> None:
        self.reader, self.qtype, self.entries = reader, qtype, []

    def stored(self, gguf_name: str, name: str, *, permute_heads: int = 0) -> None:
        if name not in self.reader.where:
            raise UserError(f"the checkpoint has no tensor {name}, which the GGUF needs for {gguf_name}")
        shape = self.reader.where[name][1].shape

        def produce() -> torch.Tensor:
            tensor = self.reader.read(name, torch.float32)
            return rotary_permute(tensor, permute_heads) if permute_heads else tensor

        self._add(gguf_name, shape, produce)

    def zeros(self, gguf_name: str, shape: tuple[int, ...], fill: float = 0.0) -> None:
        self._add(gguf_name, shape, lambda: torch.full(shape, fill))

    def computed(self, gguf_name: str, tensor: torch.Tensor) -> None:
        self._add(gguf_name, tuple(tensor.shape), lambda: tensor)

    def _add(self, gguf_name: str, shape: tuple[int, ...], produce: Callable[[], torch.Tensor]) -> None:
        qtype = self.qtype if len(shape) == 2 else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32:
            qtype = gguf.GGMLQuantizationType.F16
        self.entries.append(_Entry(gguf_name, shape, qtype, produce))


def export_gguf(
    checkpoint: str | os.PathLike[str], out_path: str | os.PathLike[str], *, dtype: str = "f16"
) -> Path:
    """Write ``checkpoint`` (a directory ``save_pruned_model`` or transformers wrote) as ``out_path``.

    Refuses to replace an existing file. Raises UserError for a family, rotary scaling or tokenizer
    the export cannot write faithfully.
    """
    checkpoint, out = Path(checkpoint), Path(out_path)
    if dtype not in QTYPES:
        raise UserError(f"gguf dtype {dtype!r}: expected one of {', '.join(QTYPES)}")
    check_output_path(out)
    if not (checkpoint / "config.json").is_file():
        raise UserError(f"{checkpoint} has no config.json")
    config = read_json_object(checkpoint / "config.json")
    check_exportable(config, str(checkpoint))
    adapter = adapter_for(config)
    sizes = adapter.layer_sizes(config)
    head_dim = adapter.head_dim(config)
    dense = adapter.dense_sizes(config)
    layers = gguf_layers(sizes, dense.num_heads // dense.num_kv_heads)
    uniform = len(set(sizes)) == 1 and sizes[0].num_kv_heads and sizes[0].intermediate_size
    arch = "llama" if uniform and adapter.name != "qwen2" else "deci"
    reader = ShardReader(find_weight_files(checkpoint))
    plan = _tensor_plan(reader, config, adapter, layers, head_dim, QTYPES[dtype])
    vocab = read_vocab(checkpoint, config, int(adapter.value(config, "vocab_size")))  # all checked now

    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.touch(exist_ok=False)
    except OSError as e:  # read-only, a file on the way, no such place: the user's path, in one line
        raise UserError(f"{out}: cannot write here: {os_error_reason(e)}") from e
    try:
        writer = gguf.GGUFWriter(partial, arch)
        _write_metadata(writer, config, adapter, layers, head_dim, arch, dtype, checkpoint)
        vocab.write(writer)
        for entry in plan.entries:
            nbytes = _nbytes(entry.shape, entry.qtype)
            writer.add_tensor_info(
                entry.name, _byte_shape(entry.shape, entry.qtype), np.uint8, nbytes, entry.qtype
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for entry in plan.entries:
            writer.write_tensor_data(_encode(entry.produce(), entry.qtype))
        writer.close()
        _publish(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%s, %s, %d tensors)", out, arch, dtype, len(plan.entries))
    return out


def _publish(partial: Path, out: Path) -> None:
    """Give the finished file its name unless something took the name meanwhile (a hard link fails on
    an existing name, where a rename would replace it)."""
    try:
        os.link(partial, out)
    except FileExistsError as e:
        raise UserError(f"{out} appeared while the export ran; it was left alone") from e
    partial.unlink()


def check_exportable(config: Mapping[str, Any], source: str = "the model") -> None:
    """Refuse, before any work, what the export cannot write: the family and the rotary scaling."""
    adapter = adapter_for(config)
    if adapter.name not in SUPPORTED_FAMILIES:
        raise UserError(
            f"{source}: GGUF export writes {', '.join(SUPPORTED_FAMILIES)} models (llama.cpp's llama and "
            f"deci graphs); {adapter.name} is not one of them"
        )
    rope = _rope(config)
    if rope["rope_type"] not in ROPE_TYPES:
        raise UserError(
            f"{source}: rotary scaling {rope['rope_type']!r} is not written by the GGUF export "
            f"({', '.join(ROPE_TYPES)} are)"
        )


def check_tokenizer(config: Mapping[str, Any], tokenizer_json: Mapping[str, Any], source: str) -> None:
    """Refuse, before any work, a tokenizer the export cannot write for this model: not BPE, ids past
    its vocabulary, any part of the wrong shape (``pruning.export.tokenizer_json``)."""
    check_tokenizer_json(tokenizer_json, int(adapter_for(config).value(config, "vocab_size")), source)


def _tensor_plan(
    reader: ShardReader,
    config: Mapping[str, Any],
    adapter: Any,
    layers: list[GgufLayer],
    head_dim: int,
    qtype: gguf.GGMLQuantizationType,
) -> _Plan:
    plan = _Plan(reader, qtype)
    hidden = int(adapter.value(config, "hidden_size"))
    plan.stored("token_embd.weight", adapter.embedding)
    for idx, layer in enumerate(layers):
        prefix, blk = f"model.layers.{idx}.", f"blk.{idx}."
        rotary = {"attn_q": layer.n_head, "attn_k": layer.n_head_kv}  # rows permuted per head
        for kind, names in ((layer.attention, ATTENTION_TENSORS), (layer.mlp, MLP_TENSORS)):
            if kind != REAL:
                continue
            for short in names:
                path = prefix + adapter.gguf_names[short]
                for suffix in ("weight", "bias"):
                    if suffix == "weight" or f"{path}.{suffix}" in reader.where:
                        heads = rotary.get(short, 0)
                        plan.stored(f"{blk}{short}.{suffix}", f"{path}.{suffix}", permute_heads=heads)
        if layer.attention == ZERO:
            q_rows = layer.n_head * head_dim
            plan.zeros(blk + "attn_norm.weight", (hidden,), 1.0)
            plan.zeros(blk + "attn_q.weight", (q_rows, hidden))
            plan.zeros(blk + "attn_k.weight", (head_dim, hidden))
            plan.zeros(blk + "attn_v.weight", (head_dim, hidden))
            plan.zeros(blk + "attn_output.weight", (hidden, q_rows))
        if layer.mlp == ZERO:
            plan.zeros(blk + "ffn_norm.weight", (hidden,), 1.0)
            plan.zeros(blk + "ffn_gate.weight", (1, hidden))
            plan.zeros(blk + "ffn_up.weight", (1, hidden))
            plan.zeros(blk + "ffn_down.weight", (hidden, 1))
    plan.stored("output_norm.weight", adapter.final_norm)
    if not adapter.tied_embeddings(config):
        plan.stored("output.weight", adapter.lm_head)  # refused if missing: llama.cpp would reuse token_embd
    factors = llama3_rope_factors(config, head_dim)
    if factors is not None:
        plan.computed(f"{adapter.gguf_buffers[0]}.weight", factors)  # llama.cpp's rotary factors
    return plan


def _rope(config: Mapping[str, Any]) -> dict[str, Any]:
    """Rotary settings, from transformers 5's ``rope_parameters`` or older ``rope_theta``/``rope_scaling``."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def llama3_rope_factors(config: Mapping[str, Any], head_dim: int) -> torch.Tensor | None:
    """Llama 3.1's per-frequency rotary scaling as the ``rope_freqs`` tensor llama.cpp multiplies in
    (transformers computes the same factors in ``_compute_llama3_parameters``); None for other kinds."""
    rope = _rope(config)
    if rope["rope_type"] != "llama3":
        return None
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (
        float(rope["rope_theta"]) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    )
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    scale = 1.0 / ((1 - smooth) / factor + smooth)
    scale = torch.where(wavelen < old_context / high, torch.ones_like(scale), scale)
    scale = torch.where(wavelen > old_context / low, torch.full_like(scale, factor), scale)
    return scale.float()


def _write_metadata(
    writer: gguf.GGUFWriter,
    config: Mapping[str, Any],
    adapter: Any,
    layers: list[GgufLayer],
    head_dim: int,
    arch: str,
    dtype: str,
    checkpoint: Path,
) -> None:
    rope = _rope(config)
    per_layer = arch == "deci"
    writer.add_name(str(config.get("_name_or_path") or checkpoint.name))
    writer.add_context_length(int(adapter.value(config, "max_position_embeddings")))
    writer.add_embedding_length(int(adapter.value(config, "hidden_size")))
    writer.add_block_count(len(layers))
    writer.add_feed_forward_length([g.n_ff for g in layers] if per_layer else layers[0].n_ff)
    writer.add_head_count([g.n_head for g in layers] if per_layer else layers[0].n_head)
    writer.add_head_count_kv([g.n_head_kv for g in layers] if per_layer else layers[0].n_head_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(adapter.value(config, "rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(adapter.value(config, "vocab_size")))
    writer.add_file_type(FILE_TYPES[dtype])
    if adapter.name == "mistral" and config.get("sliding_window"):
        logger.warning(
            "gguf: this Mistral uses a %s-token sliding window, which llama.cpp's %s graph does not apply; "
            "longer contexts will differ from transformers",
            config["sliding_window"],
            arch,
        )


def _byte_shape(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> tuple[int, ...]:
    return tuple(gguf.quant_shape_to_byte_shape(shape, qtype))


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    return int(np.prod(_byte_shape(shape, qtype)))


def _encode(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The tensor's bytes in ``qtype`` as a uint8 array (what ``add_tensor_info`` announced)."""
    if qtype == gguf.GGMLQuantizationType.F32:
        data = tensor.float().contiguous().numpy()
    elif qtype == gguf.GGMLQuantizationType.F16:
        data = tensor.half().contiguous().numpy()
    elif qtype == gguf.GGMLQuantizationType.BF16:
        data = tensor.bfloat16().contiguous().view(torch.int16).numpy()
    else:
        data = gguf.quants.quantize(tensor.float().contiguous().numpy(), qtype)
    return data.view(np.uint8).reshape(_byte_shape(tuple(tensor.shape), qtype))
