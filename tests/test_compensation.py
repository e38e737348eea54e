"""Compensation (``pruning.compensation.refit``): the refit's algebra, its place in the layer-by-layer pass,
and the oracle: a refit pruned model equals the dense model with the removed structures zeroed and
the output projections' kept columns set to the refit values."""

from __future__ import annotations

import copy

import pytest
import torch

from pruning.calibration.engine import capture_layer_inputs, run_layerwise
from pruning.calibration.observers import GramCollector
from pruning.compensation.refit import Refit, prune_with_refit, ridge_refit
from pruning.config import CompensationConfig
from pruning.families import ATTENTION, KINDS, adapter_for
from pruning.planning.plan import LayerPlan, PruningPlan
from pruning.surgery import apply_plan
from tests.oracle import zero_plan_structures
from tests.tiny_models import ARCHS, VOCAB, input_ids, make_plan, tiny_model


def _windows(n: int = 6, length: int = 12) -> torch.LongTensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(3))


def test_refit_absorbs_removed_columns_whose_inputs_the_kept_ones_explain() -> None:
    """If a removed input is a linear mix of kept ones, the refit folds its column into theirs exactly."""
    gen = torch.Generator().manual_seed(0)
    kept_inputs = torch.randn(500, 4, generator=gen, dtype=torch.float64)
    mix = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    x = torch.cat([kept_inputs, kept_inputs @ mix], dim=1)  # columns 4 and 5 are removed
    weight = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    refit = ridge_refit(weight, x.T @ x, [0, 1, 2, 3], ridge=1e-12)
    torch.testing.assert_close(refit, weight[:, :4] + weight[:, 4:] @ mix.T, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(x[:, :4] @ refit.T, x @ weight.T, rtol=1e-6, atol=1e-8)


def test_refit_equals_an_independent_ridge_solution() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    keep, ridge = [0, 2, 3, 6], 0.1
    xk = x[:, keep]
    damp = ridge * (xk * xk).sum(dim=0).mean()
    # normal equations of min ||xk W'^T - x W^T||^2 + damp ||W'||^2, solved by lstsq on a stacked system
    stacked_x = torch.cat([xk, damp.sqrt() * torch.eye(len(keep), dtype=torch.float64)])
    stacked_y = torch.cat([x @ weight.T, torch.zeros(len(keep), 5, dtype=torch.float64)])
    expected = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    torch.testing.assert_close(ridge_refit(weight, x.T @ x, keep, ridge), expected)


def test_refit_keeps_the_weight_dtype_and_device() -> None:
    weight = torch.randn(3, 5).to(torch.bfloat16)
    x = torch.randn(50, 5)
    refit = ridge_refit(weight, x.T @ x, [1, 2], 1e-3)
    assert refit.dtype == torch.bfloat16 and refit.shape == (3, 2)


def _refit_and_oracle(arch: str, selection: str = "plan"):
    """(refit pruned model, dense copy zeroed by the plan with the refit columns written in, dense copy)."""
    model = tiny_model(arch)
    planned = make_plan(model)
    dense = copy.deepcopy(model)
    plan = prune_with_refit(model, planned, _windows(), batch_size=4, selection=selection)
    oracle = copy.deepcopy(dense)
    zero_plan_structures(oracle, plan)
    adapter = adapter_for(model.config)
    head_dim = adapter.head_dim(model.config)
    for lp, dense_layer, layer, oracle_layer in zip(
        plan.layers,
        adapter.decoder_layers(dense),
        adapter.decoder_layers(model),
        adapter.decoder_layers(oracle),
        strict=True,
    ):
        geo = adapter.geometry(dense_layer, head_dim)
        for kind in KINDS:
            emptied = lp.attention_removed if kind == ATTENTION else lp.mlp_removed
            if emptied:
                continue
            keep = lp.keep_kv_groups if kind == ATTENTION else lp.keep_channels
            for owned in adapter.owned_slices(kind, geo):
                if owned.axis == 1:
                    cols = owned.indices(keep)
                    with torch.no_grad():
                        oracle_layer.get_submodule(owned.path).weight[:, cols] = layer.get_submodule(
                            owned.path
                        ).weight
    return model, oracle, dense, plan


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_refit_pruned_model_equals_the_zeroed_dense_model_with_the_refit_columns(
    arch: str, batch: int
) -> None:
    model, oracle, dense, plan = _refit_and_oracle(arch)
    ids = input_ids(batch=batch)
    with torch.no_grad():
        logits, expected, dense_logits = (m(ids).logits for m in (model, oracle, dense))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    plain = copy.deepcopy(dense)
    apply_plan(plain, plan)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    assert (logits - dense_logits).abs().max() > 1e-3  # the plan really changed the function


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_obs_selection_keeps_the_counts_and_the_returned_plan_is_what_was_removed(
    arch: str, batch: int
) -> None:
    """With ``selection="obs"`` each block loses as many structures as planned, maybe others; the
    returned plan names them, and the oracle holds for it."""
    model, oracle, _, plan = _refit_and_oracle(arch, selection="obs")
    planned = make_plan(tiny_model(arch))
    for lp, want in zip(plan.layers, planned.layers, strict=True):
        assert len(lp.remove_kv_groups) == len(want.remove_kv_groups)
        assert len(lp.remove_channels) == len(want.remove_channels)
    assert plan.extra["selection"] == "obs"
    ids = input_ids(batch=batch)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, oracle(ids).logits, atol=1e-4, rtol=0)


def _only_layer_1(model: torch.nn.Module) -> PruningPlan:
    """The tiny plan, but only for layer 1 (some KV groups, some channels)."""
    return PruningPlan(
        tuple(
            lp if lp.layer_idx == 1 else LayerPlan(lp.layer_idx, lp.num_kv_groups, lp.num_channels)
            for lp in make_plan(model).layers
        )
    )


def test_obs_selection_leaves_a_layer_no_further_from_dense_than_the_plan() -> None:
    """Greedy OBS picks, on the very inputs the refit sees, what the refit can best make up for: with
    only layer 1 pruned its block outputs end nearer the dense ones than with the plan's choice."""
    windows = _windows(n=24, length=16)
    model = tiny_model("llama_gqa")
    plan = _only_layer_1(model)
    dense, by_plan = copy.deepcopy(model), copy.deepcopy(model)
    prune_with_refit(by_plan, plan, windows, batch_size=8)
    chosen = prune_with_refit(model, plan, windows, batch_size=8, selection="obs")
    assert chosen.layers[1].remove_channels != plan.layers[1].remove_channels

    def mlp_output(m: torch.nn.Module) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        layer = adapter_for(m.config).decoder_layers(m)[1]
        handle = layer.mlp.register_forward_hook(lambda mod, a, out: seen.append(out))
        with torch.no_grad():
            m(windows)
        handle.remove()
        return seen[0]

    target = mlp_output(dense)
    assert (mlp_output(model) - target).norm() < (mlp_output(by_plan) - target).norm()


@pytest.mark.parametrize("arch", ["llama_gqa", "qwen2", "phi3", "gemma3"])
def test_refit_brings_a_pruned_layer_closer_to_the_dense_one(arch: str) -> None:
    """With only layer 1 pruned (some KV groups, some channels), its outputs on the calibration windows
    are nearer the dense layer's after the refit than after plain removal: plain removal is one of the
    solutions the least squares chose from."""
    windows = _windows(n=24, length=16)
    model = tiny_model(arch)
    plan = _only_layer_1(model)
    dense, plain = copy.deepcopy(model), copy.deepcopy(model)
    apply_plan(plain, plan)
    prune_with_refit(model, plan, windows, batch_size=8)

    def layer_1_output(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(windows, output_hidden_states=True).hidden_states[2]

    target = layer_1_output(dense)
    refit_error = (layer_1_output(model) - target).norm()
    assert refit_error < 0.9 * (layer_1_output(plain) - target).norm()


def test_gram_collector_sums_outer_products_of_every_token() -> None:
    model = tiny_model("llama_gqa")
    layer = adapter_for(model.config).decoder_layers(model)[0]
    collector = GramCollector(["self_attn.o_proj"])
    seen: list[torch.Tensor] = []
    handle = layer.self_attn.o_proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    handles = collector.watch(0, layer)
    inputs = capture_layer_inputs(model, _windows(), 3)
    with torch.no_grad():
        for b, h in enumerate(inputs.hidden):
            layer(h, *inputs.args[0][b], **inputs.kwargs[0][b])
    for h in [*handles, handle]:
        h.remove()
    x = torch.cat(seen)
    torch.testing.assert_close(collector.gram["self_attn.o_proj"], x.T @ x, rtol=1e-5, atol=1e-5)


def test_an_empty_plan_leaves_the_model_as_it_was() -> None:
    model = tiny_model("llama_gqa")
    before = copy.deepcopy(model.state_dict())
    empty = PruningPlan(
        tuple(LayerPlan(lp.layer_idx, lp.num_kv_groups, lp.num_channels) for lp in make_plan(model).layers)
    )
    prune_with_refit(model, empty, _windows(), batch_size=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_removal_error_is_what_the_best_refit_leaves() -> None:
    """``removal_errors`` against brute force: remove each block, refit the rest by least squares
    (no damping), measure the output error per token."""
    from pruning.criteria.refit_error import removal_errors

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(400, 6, generator=gen, dtype=torch.float64) @ torch.randn(
        6, 6, generator=gen, dtype=torch.float64
    )
    weight = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    blocks = torch.tensor([[0, 1], [2, 3], [4, 5]])
    errors = removal_errors(weight, x.T @ x / len(x), blocks, ridge=1e-12)
    for s, block in enumerate(blocks.tolist()):
        keep = [c for c in range(6) if c not in block]
        refit = torch.linalg.lstsq(x[:, keep], x @ weight.T).solution.T
        expected = (x[:, keep] @ refit.T - x @ weight.T).pow(2).sum() / len(x)
        torch.testing.assert_close(errors[s], expected.float(), rtol=1e-4, atol=1e-6)


def test_removal_error_with_uncorrelated_inputs_is_the_activation_energy() -> None:
    from pruning.criteria.refit_error import removal_errors

    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(4, 5, generator=gen)
    mean_square = torch.rand(5, generator=gen) + 0.5
    errors = removal_errors(weight, torch.diag(mean_square), torch.arange(5)[:, None], ridge=1e-12)
    torch.testing.assert_close(errors, weight.pow(2).sum(dim=0) * mean_square, rtol=1e-5, atol=1e-6)


def test_the_pass_hands_each_final_layer_to_done_in_eval_mode_and_restores_the_mode() -> None:
    """``done(layer)`` hears of every decoder layer, in order, once it is final (a streamed run writes it
    then): its weights then are those it ends with. The pass runs in eval mode (no dropout in the
    statistics) and gives a model in training mode back in training mode."""
    model = tiny_model("llama_gqa")
    model.train()
    heard: list[tuple[torch.nn.Module, bool, dict[str, torch.Tensor]]] = []

    def done(layer: torch.nn.Module) -> None:
        heard.append((layer, layer.training, {k: v.clone() for k, v in layer.state_dict().items()}))

    prune_with_refit(model, make_plan(model), _windows(n=4, length=8), batch_size=4, done=done)
    layers = adapter_for(model.config).decoder_layers(model)
    assert len(heard) == len(layers)
    assert all(seen is layer for (seen, _, _), layer in zip(heard, layers, strict=True))
    assert not any(training for _, training, _ in heard)
    for layer, _, state in heard:
        final = layer.state_dict()
        assert state.keys() == final.keys() and all(torch.equal(state[k], final[k]) for k in final)
    assert all(m.training for m in model.modules())


def test_a_layer_is_replayed_once_per_block_left_to_refit() -> None:
    """A block's Gram matrix costs a replay of its layer over every calibration token; a block that
    loses nothing, or everything (nothing left to refit), is not replayed. The tiny plan: layer 0 loses
    its attention and some channels, 1 some of both, 2 everything, 3 some groups and its MLP, 4 nothing."""
    model = tiny_model("llama_gqa")
    refit = Refit(model, make_plan(model))
    replays: list[tuple[int, str]] = []

    def change(layer_idx: int, layer: torch.nn.Module, replay) -> None:
        names = {module: name for name, module in layer.named_modules()}

        def counted(observers, until=None) -> None:
            replays.append((layer_idx, names[until]))
            replay(observers, until)

        refit(layer_idx, layer, counted)

    run_layerwise(model, _windows(n=4, length=8), 4, [], change=change)
    assert replays == [
        (0, "mlp.down_proj"),
        (1, "self_attn.o_proj"),
        (1, "mlp.down_proj"),
        (3, "self_attn.o_proj"),
    ]


def test_a_replay_until_a_module_stops_there_with_the_same_statistics() -> None:
    """A replay that stops at the output projection's input gathers the Gram matrix a whole replay
    gathers, bit for bit, and runs nothing after it (the attention replay never reaches the MLP)."""
    model = tiny_model("llama_gqa")
    grams: dict[str, dict[str, torch.Tensor]] = {}
    mlp_calls: list[str] = []
    layer = model.model.layers[1]
    layer.mlp.register_forward_pre_hook(lambda m, a: mlp_calls.append(current[0]))
    current = [""]

    def change(layer_idx: int, layer: torch.nn.Module, replay) -> None:
        if layer_idx != 1:
            return
        for label, until in (("whole", None), ("until", layer.self_attn.o_proj)):
            current[0] = label
            collector = GramCollector(["self_attn.o_proj"])
            replay([collector], until)
            grams[label] = collector.gram
        current[0] = "run"  # the layer's own run, after the change

    run_layerwise(model, _windows(n=5, length=8), 2, [], change=change)
    assert torch.equal(grams["until"]["self_attn.o_proj"], grams["whole"]["self_attn.o_proj"])
    assert mlp_calls.count("until") == 0 and mlp_calls.count("whole") == 3


def test_the_default_ridge_is_the_configured_one() -> None:
    """``prune_with_refit`` and ``Refit`` used without a ridge refit with ``compensation.ridge``'s default:
    the very weights that passing it gives, and not those of a ridge twice as large."""
    model = tiny_model("llama_gqa")
    plan, windows, ridge = _only_layer_1(model), _windows(n=4, length=8), CompensationConfig().ridge
    explicit, by_default, by_refit, doubled = (copy.deepcopy(model) for _ in range(4))
    prune_with_refit(explicit, plan, windows, batch_size=4, ridge=ridge)
    prune_with_refit(by_default, plan, windows, batch_size=4)
    run_layerwise(by_refit, windows, 4, [], change=Refit(by_refit, plan))
    prune_with_refit(doubled, plan, windows, batch_size=4, ridge=2 * ridge)

    def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
        x, y = a.state_dict(), b.state_dict()
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    assert same(by_default, explicit) and same(by_refit, explicit) and not same(doubled, explicit)


def test_a_nearly_dead_input_is_damped_by_the_floor() -> None:
    """The damp is ``ridge`` x the mean kept diagonal, but never below 1e-12, so that a dead or nearly dead
    input stays solvable: inputs of scale 1e-7 (Gram diagonal near 2e-12) are refit with damp 1e-12."""
    gen = torch.Generator().manual_seed(2)
    x = 1e-7 * torch.randn(200, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    keep = [0, 2, 5]
    xk = x[:, keep]
    assert 1e-3 * float((xk * xk).sum(dim=0).mean()) < 1e-13  # ridge x mean: far below the floor
    stacked_x = torch.cat([xk, 1e-6 * torch.eye(len(keep), dtype=torch.float64)])  # sqrt(1e-12) = 1e-6
    stacked_y = torch.cat([x @ weight.T, torch.zeros(len(keep), 3, dtype=torch.float64)])
    expected = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    torch.testing.assert_close(ridge_refit(weight, x.T @ x, keep, 1e-3), expected)


@pytest.mark.parametrize("arch", ["llama_gqa", "phi3", "gemma3"])
def test_dense_inputs_refit_each_block_on_the_dense_models_gram_matrices(arch: str) -> None:
    """``inputs="dense"``: every block is refit on what the dense model feeds it (the Gram matrices one
    dense layer-by-layer pass collects), not on what the pruned earlier layers produce; each layer
    runs once per batch, and the pruned model then equals the dense one with those structures zeroed and
    those refit weights written in."""
    from pruning.calibration.engine import calibrate

    model = tiny_model(arch)
    dense = copy.deepcopy(model)
    plan, windows = make_plan(model), _windows()
    adapter = adapter_for(model.config)
    layers = adapter.decoder_layers(dense)
    paths = ("self_attn.o_proj", "mlp.down_proj")
    collectors = {i: GramCollector(paths) for i in range(len(layers))}

    class Grams:
        def watch(self, idx: int, layer: torch.nn.Module):
            return collectors[idx].watch(idx, layer)

        def layer_done(self, idx: int, layer: torch.nn.Module) -> None:
            pass

    calibrate(dense, windows, 4, [Grams()])
    calls: list[int] = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    prune_with_refit(model, plan, windows, batch_size=4, inputs="dense")
    capture = [i for _ in range(2) for i in range(len(layers))]  # recorders, for the two batches
    assert calls == capture + [i for i in range(len(layers)) for _ in range(2)]  # then one run each

    expected = copy.deepcopy(dense)
    zero_plan_structures(expected, plan)
    for lp in plan.layers:
        blocks = ((ATTENTION, lp.remove_kv_groups, paths[0]), ("mlp", lp.remove_channels, paths[1]))
        for kind, removed, path in blocks:
            count = lp.num_kv_groups if kind == ATTENTION else lp.num_channels
            if not removed or len(removed) == count:
                continue
            keep = lp.keep_kv_groups if kind == ATTENTION else lp.keep_channels
            geo = adapter.geometry(layers[lp.layer_idx], adapter.head_dim(dense.config))
            owned = next(o for o in adapter.owned_slices(kind, geo) if o.axis == 1)
            weight = layers[lp.layer_idx].get_submodule(path).weight
            refit = ridge_refit(weight, collectors[lp.layer_idx].gram[path], owned.indices(keep), 1e-3)
            target = adapter.decoder_layers(expected)[lp.layer_idx].get_submodule(path).weight
            with torch.no_grad():
                target[:, owned.indices(keep)] = refit
    ids = input_ids(batch=3, length=10)
    torch.testing.assert_close(model(ids).logits, expected(ids).logits, rtol=1e-4, atol=1e-4)


def _refit_with_and_without_mlp_outputs(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, prepare=lambda model: None
):
    """(pruned with the MLP outputs handed to the next run, pruned without, up_proj calls of the first);
    ``prepare`` changes each copy first."""
    from pruning.compensation import refit as refit_module

    plan, windows = make_plan(model), _windows(n=5)
    shortcut, plain = copy.deepcopy(model), copy.deepcopy(model)
    prepare(shortcut)
    prepare(plain)
    calls: list[int] = []
    for i, layer in enumerate(adapter_for(shortcut.config).decoder_layers(shortcut)):
        layer.mlp.up_proj.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    prune_with_refit(shortcut, plan, windows, batch_size=2)
    with monkeypatch.context() as patch:
        patch.setattr(refit_module.MlpOutputs, "known", lambda self, layer, kept: None)
        prune_with_refit(plain, plan, windows, batch_size=2)
    return shortcut, plain, calls, plan


def test_the_next_run_takes_the_refit_mlps_outputs_instead_of_computing_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the MLP's refit, the layer's run that feeds the next layer reuses the projection inputs its
    replay kept: up_proj runs in the capture, the replay and the one-batch check only, never in that
    run, and the pruned model is the one computing the MLP again would give."""
    model = tiny_model("llama_gqa")
    shortcut, plain, calls, plan = _refit_with_and_without_mlp_outputs(model, monkeypatch)
    refit_mlps = [lp.layer_idx for lp in plan.layers if lp.remove_channels and not lp.mlp_removed]
    assert refit_mlps  # the tiny plan refits some MLPs
    for idx in refit_mlps:  # three batches in the replay, one check, none in the layer's run
        assert calls.count(idx) == 3 + 1, (idx, calls.count(idx))
    ids = input_ids(batch=3, length=10)
    torch.testing.assert_close(shortcut(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_an_mlp_that_does_more_than_its_projection_is_run_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin family's MLP may scale its projection's output: the first batch's check sees the MLP's
    own output differ and the layer's run computes the MLP, so the result is still right."""

    def doubled_mlps(model: torch.nn.Module) -> None:
        for layer in adapter_for(model.config).decoder_layers(model):
            forward = layer.mlp.forward
            layer.mlp.forward = lambda x, forward=forward: 2.0 * forward(x)

    model = tiny_model("llama_gqa")
    shortcut, plain, calls, plan = _refit_with_and_without_mlp_outputs(model, monkeypatch, doubled_mlps)
    refit_mlps = [lp.layer_idx for lp in plan.layers if lp.remove_channels and not lp.mlp_removed]
    assert [calls.count(idx) for idx in refit_mlps] == [3 + 1 + 3] * len(refit_mlps)  # the run computes it
    ids = input_ids(batch=3, length=10)
    torch.testing.assert_close(shortcut(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
