"""The reference methods of benchmarks/references/ on tiny random Llama models: each removes what it
claims, where it claims, and FLAP's compensation is the mean contribution of what it removed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from pruning.checkpoint.modeling_pruned import ZeroAttention, ZeroMLP
from pruning.families import adapter_for
from tests.benchmark_modules import load_benchmark
from tests.tiny_models import input_ids, tiny_model

ROOT = Path(__file__).resolve().parents[1]


refs = load_benchmark("references")
OURS_SURGERY = ("random", "magnitude_uniform", "wanda_sp_uniform", "llm_pruner_taylor", "flap")
UNIFORM = ("magnitude_uniform", "wanda_sp_uniform")
RATIO = 0.3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; more only contend (seconds instead of tenths)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def windows(n: int = 4, length: int = 16, seed: int = 0) -> torch.LongTensor:
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def geometries(model: nn.Module) -> list[tuple[int, int]]:
    """(KV groups, channels) per layer, read from the weights."""
    adapter = adapter_for(model.config)
    head_dim = adapter.head_dim(model.config)
    return [
        (g.num_kv_heads, g.intermediate_size)
        for g in (adapter.geometry(layer, head_dim) for layer in adapter.decoder_layers(model))
    ]


def prune(method: str, ratio: float = RATIO, **kwargs: object) -> tuple[nn.Module, nn.Module, dict]:
    """(pruned model, its dense original, notes)."""
    dense = tiny_model("llama_gqa")
    model = copy.deepcopy(dense)
    notes = refs.METHODS[method](model, windows(), ratio, 2, **kwargs)
    return model, dense, notes


@pytest.mark.parametrize("method", OURS_SURGERY)
def test_removes_the_target_share_of_all_parameters(method: str) -> None:
    model, dense, notes = prune(method)
    before, after = numel(dense), numel(model)
    assert (notes["params_before"], notes["params_after"]) == (before, after)
    assert notes["removed_share"] == pytest.approx((before - after) / before)
    costs = refs.describe(dense).costs
    lc = costs[0]
    if method in ("random", "flap"):  # global ranking: stops at the first structure reaching the target
        allowance = max(lc.kv_group_cost + lc.attention_block_cost, lc.channel_cost + lc.mlp_block_cost)
    else:  # same counts per layer: less than one channel per pruned layer over
        allowance = len(costs) * lc.channel_cost
    added = notes.get("bias_params_added", 0)  # FLAP's compensation adds parameters
    removed = before - after
    assert RATIO * before - added <= removed < RATIO * before + allowance
    with torch.no_grad():
        assert torch.isfinite(model(input_ids()).logits).all()


@pytest.mark.parametrize("method", UNIFORM)
def test_uniform_methods_remove_the_same_counts_from_every_layer(method: str) -> None:
    model, dense, notes = prune(method)
    after, before = geometries(model), geometries(dense)
    assert len(set(after)) == 1 and after[0] != before[0]
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(after, before, strict=True))


def test_llm_pruner_leaves_the_first_and_last_layers_alone() -> None:
    model, dense, notes = prune("llm_pruner_taylor")
    after, before = geometries(model), geometries(dense)
    assert after[0] == before[0] and after[-1] == before[-1]
    middle = after[1:-1]
    assert len(set(middle)) == 1 and middle[0] != before[1]
    torch.testing.assert_close(
        model.model.layers[0].mlp.gate_proj.weight, dense.model.layers[0].mlp.gate_proj.weight
    )


def test_uniform_counts_reach_the_target_by_less_than_one_channel_per_layer() -> None:
    costs = refs.describe(tiny_model("llama_gqa")).costs
    lc = costs[0]
    for target in (1_000, 20_000, 60_000, 80_000):
        counts = refs.uniform_counts(costs, target, range(1, 4))
        removed = 3 * (counts.kv_groups * lc.kv_group_cost + counts.channels * lc.channel_cost)
        assert target <= removed < target + 3 * lc.channel_cost + (3 * lc.attention_block_cost)
    with pytest.raises(ValueError, match="fewer than"):
        refs.uniform_counts(costs, 10**9, range(5))


def _hooked_inputs(model: nn.Module, paths: tuple[str, ...], batch: torch.LongTensor) -> dict:
    """Inputs of the named Linears of every layer over one whole-model forward (no engine involved)."""
    seen: dict = {}
    handles = []
    for idx, layer in enumerate(model.model.layers):
        for path in paths:

            def hook(module: nn.Module, args: tuple, key: tuple = (idx, path)) -> None:
                seen.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())

            handles.append(layer.get_submodule(path).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return {key: torch.cat(parts) for key, parts in seen.items()}


def test_wanda_sp_first_layer_removes_the_lowest_scores() -> None:
    """Layer 0 sees the dense embeddings either way: its removals are the lowest sum |W_ij| * ||X_j||."""
    model, dense, notes = prune("wanda_sp_uniform")
    inputs = _hooked_inputs(dense, ("self_attn.o_proj", "mlp.down_proj"), windows())
    layer = dense.model.layers[0]
    norms = inputs[(0, "mlp.down_proj")].pow(2).sum(0).sqrt()
    channel_scores = (layer.mlp.down_proj.weight.double().abs() * norms).sum(0)
    kept_channels = model.model.layers[0].mlp.gate_proj.out_features
    expected = set(torch.argsort(channel_scores, descending=True)[:kept_channels].tolist())
    kept = _kept_rows(layer.mlp.gate_proj.weight, model.model.layers[0].mlp.gate_proj.weight)
    assert kept == sorted(expected)
    norms = inputs[(0, "self_attn.o_proj")].pow(2).sum(0).sqrt()
    col_scores = (layer.self_attn.o_proj.weight.double().abs() * norms).sum(0)
    group_scores = col_scores.reshape(2, -1).sum(1)  # 2 KV groups of 2 query heads x 16
    kept_groups = _kept_groups(layer, model.model.layers[0])
    assert kept_groups == [int(group_scores.argmax())]


def _kept_rows(dense_weight: torch.Tensor, pruned_weight: torch.Tensor) -> list[int]:
    """Which dense rows survive, by exact equality (surgery copies rows)."""
    match = (dense_weight[None, :, :] == pruned_weight[:, None, :]).all(dim=-1)
    assert (match.sum(dim=1) == 1).all()
    return match.float().argmax(dim=1).tolist()


def _kept_groups(dense_layer: nn.Module, pruned_layer: nn.Module, head_dim: int = 16) -> list[int]:
    if isinstance(pruned_layer.self_attn, ZeroAttention):
        return []
    rows = _kept_rows(dense_layer.self_attn.k_proj.weight, pruned_layer.self_attn.k_proj.weight)
    return sorted({r // head_dim for r in rows})


def test_flap_bias_is_the_mean_contribution_of_the_removed_columns() -> None:
    """Oracle: the dense model with every removed column's input replaced by its calibration mean
    computes exactly what the pruned, compensated model computes."""
    model, dense, notes = prune("flap", ratio=0.6)  # empties an attention block on this model
    assert notes["removed_kv_groups"] > 0 and notes["attention_blocks_removed"]
    paths = {"attention": "self_attn.o_proj", "mlp": "mlp.down_proj"}
    inputs = _hooked_inputs(dense, tuple(paths.values()), windows())
    means = {key: x.mean(dim=0) for key, x in inputs.items()}
    removed_cols: dict = {}
    group_width = 2 * 16
    for idx, (d_layer, p_layer) in enumerate(zip(dense.model.layers, model.model.layers, strict=True)):
        kept_groups = _kept_groups(d_layer, p_layer)
        removed_cols[(idx, paths["attention"])] = [
            c for g in range(2) if g not in kept_groups for c in range(g * group_width, (g + 1) * group_width)
        ]
        kept = (
            []
            if isinstance(p_layer.mlp, ZeroMLP)
            else _kept_rows(d_layer.mlp.gate_proj.weight, p_layer.mlp.gate_proj.weight)
        )
        removed_cols[(idx, paths["mlp"])] = [c for c in range(96) if c not in kept]
        for kind, path in paths.items():
            cols = removed_cols[(idx, path)]
            block = p_layer.self_attn if kind == "attention" else p_layer.mlp
            bias = (
                block.bias
                if isinstance(block, ZeroAttention | ZeroMLP)
                else block.get_submodule(path.split(".")[1]).bias
            )
            if not cols:
                assert bias is None
                continue
            weight = d_layer.get_submodule(path).weight.double()
            expected = weight[:, cols] @ means[(idx, path)][cols]
            torch.testing.assert_close(bias.double(), expected, atol=1e-5, rtol=1e-5)

    oracle = copy.deepcopy(dense)
    for (idx, path), cols in removed_cols.items():
        if not cols:
            continue
        index = torch.tensor(cols)
        mean = means[(idx, path)][index].float()

        def replace(
            module: nn.Module, args: tuple, index: torch.Tensor = index, mean: torch.Tensor = mean
        ) -> tuple:
            x = args[0].clone()
            x[..., index] = mean
            return (x,)

        oracle.model.layers[idx].get_submodule(path).register_forward_pre_hook(replace)
    ids = input_ids(batch=2, length=12)
    with torch.no_grad():
        pruned_logits, oracle_logits, dense_logits = (m(ids).logits for m in (model, oracle, dense))
    torch.testing.assert_close(pruned_logits, oracle_logits, atol=1e-4, rtol=0)
    assert (pruned_logits - dense_logits).abs().max() > 0.1


@pytest.mark.parametrize(
    "shape",
    [
        {"hidden_size": 96, "num_attention_heads": 6},  # 6 query heads over 2 KV heads: Torch-Pruning runs
        {},  # 4 over 2: its dependency tracing never returns (torch-pruning 1.6.1)
    ],
)
def test_torch_pruning_reports_what_happened(shape: dict) -> None:
    dense = tiny_model("llama_gqa", **shape)
    model = copy.deepcopy(dense)
    notes = refs.torch_pruning(model, windows(), RATIO, 2, timeout_s=3)
    before = numel(dense)
    assert notes["params_before"] == before
    assert any("use_cache" in n for n in notes["needed"])
    if "failed" in notes:
        assert notes["failed"].strip() and "removed_share" not in notes
        return
    after = numel(model)
    assert notes["params_after"] == after
    assert notes["removed_share"] == pytest.approx((before - after) / before)
    assert abs(notes["removed_share"] - RATIO) < 0.05
    assert notes["predicted_share"] == pytest.approx(notes["removed_share"], abs=1e-4)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again, counted once
    with torch.no_grad():
        assert torch.isfinite(model(input_ids()).logits).all()
