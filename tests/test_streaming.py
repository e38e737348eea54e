"""Streamed and part-placed models: the same scores, plan and pruned tensors as the in-memory path,
holding one decoder layer's weights at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from pruning.checkpoint.load import load_pruned_model
from pruning.checkpoint.save import partial_dir, save_pruned_model
from pruning.config import ModelConfig
from pruning.criteria.registry import get_criterion
from pruning.errors import UserError
from pruning.families import adapter_for
from pruning.pipeline.prune_step import prune_and_write
from pruning.planning.planner import plan_global
from pruning.source.placement import DISK, resolve_placement
from pruning.source.streaming import build_skeleton, load_placed
from pruning.storage.shards import ShardReader
from pruning.storage.weight_files import find_weight_files
from pruning.surgery import apply_plan
from tests.tiny_models import ARCHS, input_ids, tiny_model


def _source(tmp_path: Path, arch: str) -> Path:
    directory = tmp_path / f"{arch}-source"
    tiny_model(arch).save_pretrained(directory, max_shard_size=20_000)  # several shards
    return directory


def _placed(directory: Path, dtype: torch.dtype, **model_config):
    config = AutoModelForCausalLM.from_pretrained(directory).config
    skeleton = build_skeleton(config, dtype)
    placement = resolve_placement(ModelConfig(path=str(directory), **model_config), skeleton)
    reader = ShardReader(find_weight_files(directory))
    return load_placed(skeleton, reader, placement, dtype)


def _saved(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in find_weight_files(directory).safetensors:
        out.update(load_file(file))
    return out


def _prune(model, store, plan, out: Path, streamed: bool) -> Path:
    if streamed:
        weights = partial_dir(out)
        prune_and_write(model, plan, store, weights, max_shard_bytes=30_000)
        return save_pruned_model(model, None, out, weights_dir=weights)
    apply_plan(model, plan)
    return save_pruned_model(model, None, out, max_shard_size=30_000)


def _run(directory: Path, out: Path, dtype: torch.dtype, criterion: str, **model_config):
    """(scores, plan, saved tensors) of one run; in memory when ``model_config`` is empty."""
    if model_config:
        model, store = _placed(directory, dtype, **model_config)
    else:
        model, store = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval(), None
    options = {"store": store} | ({"batch_size": 3} if criterion in ("activation", "obs_fisher") else {})
    scores = get_criterion(criterion, **options).score(model, input_ids(batch=5, length=12, seed=7))
    plan = plan_global(model, scores, 0.3)
    streamed = any(p.is_meta for p in model.parameters())
    return scores, plan, _saved(_prune(model, store, plan, out, streamed))


def _assert_same(a, b) -> None:
    scores_a, plan_a, saved_a = a
    scores_b, plan_b, saved_b = b
    for x, y in zip(scores_a.attention + scores_a.mlp, scores_b.attention + scores_b.mlp, strict=True):
        assert torch.equal(x, y)
    assert plan_a.layers == plan_b.layers
    assert sorted(saved_a) == sorted(saved_b)
    for name, tensor in saved_a.items():
        assert saved_b[name].dtype == tensor.dtype and torch.equal(saved_b[name], tensor), name


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_run_equals_the_in_memory_run(tmp_path: Path, arch: str) -> None:
    source = _source(tmp_path, arch)
    in_memory = _run(source, tmp_path / "memory", torch.float32, "activation")
    streamed = _run(source, tmp_path / "streamed", torch.float32, "activation", streaming="always")
    _assert_same(in_memory, streamed)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_streamed_obs_fisher_run_equals_the_in_memory_run(tmp_path: Path, arch: str) -> None:
    """The loss-aware criterion streams too: its Fisher backward runs layer by layer in reverse,
    reading each layer's weights again, and gives the in-memory scores, plan and tensors exactly."""
    source = _source(tmp_path, arch)
    in_memory = _run(source, tmp_path / "memory", torch.float32, "obs_fisher")
    streamed = _run(source, tmp_path / "streamed", torch.float32, "obs_fisher", streaming="always")
    _assert_same(in_memory, streamed)


@pytest.mark.parametrize("criterion", ["activation", "magnitude"])
def test_bf16_streamed_run_equals_the_in_memory_run(tmp_path: Path, criterion: str) -> None:
    """Stored float32, run in bfloat16: streamed tensors are cast as from_pretrained casts them."""
    source = _source(tmp_path, "llama_gqa")
    in_memory = _run(source, tmp_path / "memory", torch.bfloat16, criterion)
    streamed = _run(source, tmp_path / "streamed", torch.bfloat16, criterion, streaming="always")
    _assert_same(in_memory, streamed)
    assert all(t.dtype == torch.bfloat16 for t in streamed[2].values())


@pytest.mark.parametrize("arch", ["llama_mha", "phi3", "gemma3"])
def test_some_layers_in_memory_some_streamed_equals_the_in_memory_run(tmp_path: Path, arch: str) -> None:
    source = _source(tmp_path, arch)
    device_map = {"": "cpu", "model.layers.1": DISK, "model.layers.3": DISK, "lm_head": DISK}
    if arch == "gemma3":  # tied head: the embeddings go to disk instead
        device_map = {"": DISK, "model.layers.0": "cpu", "model.layers.2": "cpu"}
    in_memory = _run(source, tmp_path / "memory", torch.float32, "activation")
    mixed = _run(source, tmp_path / "mixed", torch.float32, "activation", device_map=device_map)
    _assert_same(in_memory, mixed)


def test_a_streamed_checkpoint_reloads_and_gives_the_in_memory_logits(tmp_path: Path) -> None:
    source = _source(tmp_path, "qwen3")
    _run(source, tmp_path / "memory", torch.float32, "activation")
    _run(source, tmp_path / "streamed", torch.float32, "activation", streaming="always")
    ids = input_ids(batch=3)
    logits = [load_pruned_model(tmp_path / d)(ids).logits for d in ("memory", "streamed")]
    assert torch.equal(logits[0], logits[1])


class ResidentCounter:
    """An observer that records how many decoder layers hold real weights while each layer computes."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = adapter_for(model.config).decoder_layers(model)
        self.embedding = model.get_input_embeddings()
        self.seen: list[int] = []

    def watch(self, layer_idx: int, layer: nn.Module):
        resident = sum(not next(lay.parameters()).is_meta for lay in self.layers)
        self.seen.append(resident)
        assert self.embedding.weight.is_meta  # released once the first layer's inputs were captured
        return []

    def layer_done(self, layer_idx: int, layer: nn.Module) -> None:
        pass


def test_a_streamed_pass_holds_one_layer_at_a_time(tmp_path: Path) -> None:
    from pruning.calibration.engine import calibrate

    source = _source(tmp_path, "llama_mha")
    model, store = _placed(source, torch.float32, streaming="always")
    counter = ResidentCounter(model)
    calibrate(model, input_ids(batch=5, length=12), 2, [counter], "layerwise", store)
    assert counter.seen == [1] * 5
    assert all(p.is_meta for p in model.parameters())


def test_a_streamed_model_refuses_what_needs_it_whole(tmp_path: Path) -> None:
    source = _source(tmp_path, "llama_gqa")
    model, store = _placed(source, torch.float32, streaming="always")
    windows = input_ids(batch=2, length=8)
    with pytest.raises(UserError, match="taylor needs a backward"):
        get_criterion("taylor").score(model, windows)
    with pytest.raises(UserError, match="whole_model needs every weight"):
        get_criterion("obs_fisher", engine="whole_model", store=store).score(model, windows)
    with pytest.raises(UserError, match="whole_model needs every weight"):
        get_criterion("activation", engine="whole_model", store=store).score(model, windows)


def test_device_hooks_leave_whole_model_passes_and_saving_unchanged(tmp_path: Path) -> None:
    """The hooks a GPU-and-CPU map gets (tests/test_gpu.py runs them across devices), here on one
    device: forwards, taylor's backward, surgery and saving are those of the plain model."""
    from pruning.source.placement import Placement, part_names
    from pruning.source.streaming import _attach_device_hooks

    source = _source(tmp_path, "llama_gqa")
    plain = AutoModelForCausalLM.from_pretrained(source).eval()
    hooked = AutoModelForCausalLM.from_pretrained(source).eval()
    _attach_device_hooks(hooked, Placement(dict.fromkeys(part_names(hooked), "cpu"), "cpu", "test"))
    assert hasattr(adapter_for(hooked.config).decoder_layers(hooked)[0], "_hf_hook")
    ids = input_ids(batch=3)
    assert torch.equal(plain(ids).logits, hooked(ids).logits)
    scores = [get_criterion("taylor").score(m, ids) for m in (plain, hooked)]
    assert all(torch.equal(a, b) for a, b in zip(scores[0].mlp, scores[1].mlp, strict=True))
    plan = plan_global(plain, scores[0], 0.3)
    for model, name in ((plain, "plain"), (hooked, "hooked")):
        apply_plan(model, plan)
        save_pruned_model(model, None, tmp_path / name)
    saved = [_saved(tmp_path / name) for name in ("plain", "hooked")]
    assert sorted(saved[0]) == sorted(saved[1])
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


def test_capture_reads_only_the_embeddings(tmp_path: Path) -> None:
    """Norm and head never run during capture (it stops at the last layer), so they are never read."""
    from pruning.calibration.engine import calibrate

    source = _source(tmp_path, "llama_mha")  # untied head: a part of its own
    model, store = _placed(source, torch.float32, streaming="always")
    seen: list[tuple[bool, bool, bool]] = []

    def check(module, args):
        seen.append(
            (
                model.get_input_embeddings().weight.is_meta,
                model.model.norm.weight.is_meta,
                model.lm_head.weight.is_meta,
            )
        )

    adapter_for(model.config).decoder_layers(model)[0].register_forward_pre_hook(check)
    calibrate(model, input_ids(batch=4, length=12), 2, [], "layerwise", store)
    assert seen[0] == (False, True, True)  # while capturing: embeddings only
    assert all(s[0] and s[1] and s[2] for s in seen[2:])  # the layer pass: none of them


def test_the_pruning_pass_holds_one_layer_and_a_failure_leaves_nothing_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from pruning.pipeline import prune_step as streaming

    source = _source(tmp_path, "llama_mha")
    model, store = _placed(source, torch.float32, streaming="always")
    scores = get_criterion("magnitude", store=store).score(model, None)
    plan = plan_global(model, scores, 0.3)
    layers = adapter_for(model.config).decoder_layers(model)
    resident: list[int] = []
    real_prune = streaming.apply_layer_plan

    def watched(model_, layer_plan):
        resident.append(sum(not next(layer.parameters()).is_meta for layer in layers))
        if layer_plan.layer_idx == 3:
            raise OSError(28, "No space left on device")
        real_prune(model_, layer_plan)

    monkeypatch.setattr(streaming, "apply_layer_plan", watched)
    fds = len(os.listdir("/proc/self/fd"))
    weights = partial_dir(tmp_path / "out")
    with pytest.raises(OSError, match="No space"):
        prune_and_write(model, plan, store, weights, max_shard_bytes=30_000)
    assert resident == [1, 1, 1, 1]
    assert len(os.listdir("/proc/self/fd")) == fds
    assert all(p.is_meta for p in model.parameters())  # the failed layer was dropped too


@pytest.mark.parametrize("arch", ["llama_mha", "gemma2"])  # untied head; tied head with soft-capping
def test_a_streamed_model_has_the_in_memory_perplexity(tmp_path: Path, arch: str) -> None:
    from pruning.calibration.perplexity import perplexity

    source = _source(tmp_path, arch)
    windows = input_ids(batch=5, length=12, seed=3)
    dense = AutoModelForCausalLM.from_pretrained(source).eval()
    model, store = _placed(source, torch.float32, streaming="always")
    expected = perplexity(dense, windows, batch_size=2)
    assert perplexity(model, windows, batch_size=2, engine="layerwise", store=store) == expected
    assert perplexity(dense, windows, batch_size=2, engine="layerwise") == expected
    assert all(p.is_meta for p in model.parameters())  # head and embeddings dropped again
