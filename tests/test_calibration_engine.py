"""The calibration engine: layer by layer and whole model give the same statistics, scores and plans."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruning.calibration.engine import calibrate, capture_layer_inputs
from pruning.criteria.activation import ActivationCriterion
from pruning.errors import UserError
from pruning.families import adapter_for
from pruning.planning.planner import plan_global
from pruning.surgery import apply_plan
from tests.tiny_models import ARCH_IMPLS, input_ids, make_plan, tiny_model


class OutputRecorder:
    """An observer that keeps every layer's outputs, batch by batch."""

    def __init__(self) -> None:
        self.outputs: dict[int, list[torch.Tensor]] = {}
        self.done: list[int] = []

    def watch(self, layer_idx: int, layer: nn.Module):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.outputs.setdefault(layer_idx, []).append(out.detach().clone())

        return [layer.register_forward_hook(hook)]

    def layer_done(self, layer_idx: int, layer: nn.Module) -> None:
        self.done.append(layer_idx)


def _windows(count: int = 5, length: int = 12) -> torch.LongTensor:
    return input_ids(batch=count, length=length, seed=7)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize(("arch", "impl"), ARCH_IMPLS)
def test_every_layer_sees_the_same_inputs_on_both_paths(arch: str, impl: str, batch_size: int) -> None:
    """Sliding-window lengths (12 > 8) and Gemma's per-layer masks and rotary tables included."""
    model = tiny_model(arch, impl)
    recorders = {engine: OutputRecorder() for engine in ("layerwise", "whole_model")}
    for engine, recorder in recorders.items():
        calibrate(model, _windows(), batch_size, [recorder], engine)
    layerwise, whole = recorders["layerwise"], recorders["whole_model"]
    assert layerwise.done == whole.done == list(range(5))
    for idx in range(5):
        assert len(layerwise.outputs[idx]) == len(whole.outputs[idx]) == -(-5 // batch_size)
        for a, b in zip(layerwise.outputs[idx], whole.outputs[idx], strict=True):
            assert torch.equal(a, b)  # the same kernels on the same inputs: bit for bit


@pytest.mark.parametrize("arch", ["llama_mha", "qwen3", "phi3", "gemma2", "gemma3"])
def test_activation_scores_and_plans_are_the_same_on_both_paths(arch: str) -> None:
    model = tiny_model(arch)
    windows = _windows()
    scores = {
        e: ActivationCriterion(batch_size=2, engine=e).score(model, windows)
        for e in ("layerwise", "whole_model")
    }
    a, b = scores["layerwise"], scores["whole_model"]
    assert all(torch.equal(x, y) for x, y in zip(a.attention + a.mlp, b.attention + b.mlp, strict=True))
    assert plan_global(model, a, 0.3).layers == plan_global(model, b, 0.3).layers


def test_a_pruned_model_calibrates_layer_by_layer() -> None:
    """Zero* blocks and per-layer sizes: the engine only calls layers, whatever they hold."""
    model = tiny_model("qwen2")
    apply_plan(model, make_plan(model))
    windows = _windows()
    a = ActivationCriterion(batch_size=2, engine="layerwise").score(model, windows)
    b = ActivationCriterion(batch_size=2, engine="whole_model").score(model, windows)
    assert [t.numel() for t in a.attention] == [0, 1, 0, 1, 2]
    for x, y in zip(a.attention + a.mlp, b.attention + b.mlp, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=0)


def test_capture_records_each_layer_and_restores_forward() -> None:
    model = tiny_model("gemma3")
    layers = adapter_for(model.config).decoder_layers(model)
    inputs = capture_layer_inputs(model, _windows(), 2)
    assert len(inputs.hidden) == 3 and inputs.hidden[0].shape == (2, 12, 64)
    assert all(len(per_batch) == 3 for per_batch in inputs.kwargs)
    # sliding and global layers get different masks (layer_types alternate in the tiny Gemma 3)
    masks = [inputs.kwargs[i][0]["attention_mask"] for i in (0, 1)]
    assert not torch.equal(masks[0], masks[1])
    assert all("forward" not in vars(layer) for layer in layers)


def test_forward_is_restored_when_capture_fails() -> None:
    model = tiny_model("llama_gqa")
    layers = adapter_for(model.config).decoder_layers(model)
    with pytest.raises(IndexError):
        capture_layer_inputs(model, torch.full((2, 6), 10_000), 2)  # token ids beyond the vocabulary
    assert all("forward" not in vars(layer) for layer in layers)


def test_an_instance_forward_is_put_back() -> None:
    """accelerate's device hooks live in an instance-level forward; calibration must not drop them."""
    model = tiny_model("llama_gqa")
    layers = adapter_for(model.config).decoder_layers(model)
    calls: list[int] = []
    original = type(layers[2]).forward.__get__(layers[2])

    def wrapped(*args, **kwargs):
        calls.append(2)
        return original(*args, **kwargs)

    layers[2].forward = wrapped
    ActivationCriterion(batch_size=2).score(model, _windows())
    assert vars(layers[2])["forward"] is wrapped and "forward" not in vars(layers[1])
    assert calls  # the layer-by-layer pass ran through it


def test_unknown_engine_is_a_user_error() -> None:
    with pytest.raises(UserError, match="calibration.engine"):
        calibrate(tiny_model("llama_gqa"), _windows(), 2, [], "streaming")


@pytest.mark.parametrize("arch", ["llama_mha", "phi3", "gemma3"])
def test_a_pass_that_prunes_each_layer_as_it_goes_equals_the_pruned_model(arch: str) -> None:
    """The change hook: each layer is pruned just before it computes, so every later layer sees the
    outputs of pruned layers, exactly what the pruned model's own forward gives it."""
    import copy

    from pruning.calibration.engine import run_layerwise, run_whole_model
    from pruning.surgery import apply_layer_plan

    model = tiny_model(arch)
    plan = make_plan(model)
    reference = copy.deepcopy(model)
    apply_plan(reference, plan)
    as_it_goes, whole = OutputRecorder(), OutputRecorder()
    run_layerwise(
        model,
        _windows(),
        2,
        [as_it_goes],
        change=lambda idx, layer, replay: apply_layer_plan(model, plan.layers[idx]),
    )
    run_whole_model(reference, _windows(), 2, [whole])
    for idx in range(5):
        assert all(
            torch.equal(a, b) for a, b in zip(as_it_goes.outputs[idx], whole.outputs[idx], strict=True)
        )
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())


def test_bf16_model_calibrates_with_fp32_statistics() -> None:
    """A bf16 model stays bf16 (no fp32 copy of it); statistics and scores are accumulated in fp32."""
    model = tiny_model("llama_gqa").to(torch.bfloat16)
    windows = _windows()
    a = ActivationCriterion(batch_size=2, engine="layerwise").score(model, windows)
    b = ActivationCriterion(batch_size=2, engine="whole_model").score(model, windows)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for x, y in zip(a.attention + a.mlp, b.attention + b.mlp, strict=True):
        assert x.dtype == torch.float32 and torch.isfinite(x).all() and torch.equal(x, y)
    reference = ActivationCriterion(batch_size=2).score(tiny_model("llama_gqa"), windows)  # the fp32 model
    for x, y in zip(a.mlp, reference.mlp, strict=True):
        assert torch.corrcoef(torch.stack([x, y]))[0, 1] > 0.99  # bf16 rounding, same ranking signal


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize(("arch", "impl"), ARCH_IMPLS)
def test_layerwise_logits_equal_a_whole_model_forward(arch: str, impl: str, batch_size: int) -> None:
    """Final norm, head and Gemma's logit soft-capping come from the model's own forward."""
    from pruning.calibration.layer_head import layerwise_logits

    model = tiny_model(arch, impl)
    windows = _windows()
    whole = [model(input_ids=b, use_cache=False).logits for b in windows.split(batch_size)]
    layerwise = list(layerwise_logits(model, windows, batch_size))
    assert len(layerwise) == len(whole)
    for (batch, logits), expected, part in zip(layerwise, whole, windows.split(batch_size), strict=True):
        assert torch.equal(batch, part) and torch.equal(logits, expected)
    assert not any("forward" in vars(layer) for layer in adapter_for(model.config).decoder_layers(model))
