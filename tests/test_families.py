"""Family adapters: the registry, plugins from outside the package, the layout parser, fused
projections, post-norms, and that no other module holds family knowledge."""

from __future__ import annotations

import ast
import copy
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
import torch
from transformers import GraniteConfig, GraniteForCausalLM

import pruning
import pruning.families as families
from pruning.checkpoint.load import load_pruned_model
from pruning.checkpoint.save import save_pruned_model
from pruning.criteria.activation import ActivationCriterion
from pruning.errors import UserError
from pruning.families import BUILTIN, FamilyRegistry, Layout, adapter_for, check_supported
from pruning.families.llama import LlamaFamily
from pruning.surgery import apply_plan
from tests.oracle import zero_plan_structures
from tests.tiny_models import input_ids, make_plan, tiny_model

# -- registry ------------------------------------------------------------------------------------


def test_check_supported_names_every_registered_family() -> None:
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"):
        assert check_supported({"model_type": model_type}) == model_type
    with pytest.raises(UserError) as err:
        check_supported({"model_type": "gpt2"})
    message = str(err.value)
    assert "'gpt2'" in message and "phi3" in message and "gemma3_text" in message
    with pytest.raises(UserError, match="multimodal"):
        check_supported({"model_type": "gemma3"})


def test_registry_refuses_a_second_adapter_for_a_model_type() -> None:
    registry = FamilyRegistry(BUILTIN)

    class AnotherLlama(LlamaFamily):
        model_types = ("llama",)

    with pytest.raises(ValueError, match="llama"):
        registry.register(AnotherLlama)
    with pytest.raises(TypeError):
        registry.register(object)  # type: ignore[arg-type]


README = Path(__file__).resolve().parent.parent / "docs" / "families.md"


def _readme_block(language: str, starts_with: str) -> str:
    """docs/families.md's code block in ``language`` starting with ``starts_with`` (the example)."""
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    return next(block for block in blocks if block.startswith(starts_with))


@pytest.fixture
def granite_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented example installed as a distribution (a dist-info on sys.path) with its entry
    point; the package registry is a fresh one, so the plugin does not outlive the test."""
    (tmp_path / "granite_family.py").write_text(_readme_block("python", "# granite_family.py"))
    declared = tomllib.loads(_readme_block("toml", "[project.entry-points"))
    group = declared["project"]["entry-points"]["pruning.families"]
    dist = tmp_path / "granite_family-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: granite-family\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in group.items())
    (dist / "entry_points.txt").write_text(f"[pruning.families]\n{lines}")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(families, "FAMILIES", FamilyRegistry(BUILTIN))
    yield
    sys.modules.pop("granite_family", None)


def _tiny_granite() -> GraniteForCausalLM:
    torch.manual_seed(0)
    config = GraniteConfig(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=5,
        vocab_size=128,
        residual_multiplier=0.5,
        embedding_multiplier=2.0,
        pad_token_id=0,
    )
    model = GraniteForCausalLM._from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape) if "norm" in name else 0.1 * torch.randn(p.shape))
    return model.eval()


def test_adapter_from_an_entry_point_is_picked_up(granite_plugin: None, tmp_path: Path) -> None:
    assert "granite" in families.FAMILIES.model_types()
    assert "granite_family" not in sys.modules  # named in the list, imported only when used
    model = _tiny_granite()
    assert type(adapter_for(model.config)).__name__ == "GraniteFamily"
    plan = make_plan(model)
    zeroed = copy.deepcopy(model)
    zero_plan_structures(zeroed, plan)
    apply_plan(model, plan)
    ids = input_ids(batch=3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, zeroed(ids).logits, atol=1e-4, rtol=0)
    loaded = load_pruned_model(save_pruned_model(model, None, tmp_path / "granite"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_a_broken_plugin_is_one_line(granite_plugin: None, tmp_path: Path) -> None:
    (tmp_path / "granite_family.py").write_text("raise ImportError('no such thing')\n")
    with pytest.raises(UserError, match="plugin 'granite'.*failed to load"):
        adapter_for({"model_type": "granite"})


# -- layout ----------------------------------------------------------------------------------------


def _layout(**changes: object) -> dict:
    data = {
        "version": 1,
        "num_attention_heads": [4, 0],
        "num_key_value_heads": [2, 0],
        "intermediate_size": [9, 0],
    }
    return {**data, **changes}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "must be an object"),
        (_layout(version=2), "unsupported version 2"),
        (_layout(intermediate_size=[9]), r"intermediate_size must be a list of 2"),
        (_layout(num_key_value_heads=[2, -1]), "num_key_value_heads must be a list"),
        (_layout(num_attention_heads=[True, 0]), "num_attention_heads must be a list"),
        (_layout(num_attention_heads=[3, 0]), "layer 0 has 3 query heads for 2 KV heads"),
        (_layout(num_key_value_heads=[2, 1]), "layer 1 has 0 query heads for 1 KV heads"),
    ],
)
def test_layout_parser_names_what_is_wrong(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Layout.parse(data, 2)


def test_layout_round_trips_through_json() -> None:
    layout = Layout.parse(_layout(), 2)
    assert [s.num_heads for s in layout] == [4, 0] and len(layout) == 2
    assert Layout.parse(layout.to_json(), 2) == layout


def test_a_layout_the_dense_model_cannot_shrink_to_is_refused(tmp_path: Path) -> None:
    """Two heads over two KV heads parses, but a layer of 4 heads over 2 cannot lose heads and keep its
    KV heads: surgery removes whole groups."""
    model = tiny_model("llama_gqa")
    apply_plan(model, make_plan(model))  # layers differ, so config.json has a layout; layer 4 is whole
    out = save_pruned_model(model, None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config["pruning_layout"]["num_attention_heads"][4] = 2
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="layer 4: 2 heads, 2 KV heads and 96 channels cannot come from"):
        load_pruned_model(out)


# -- fused projections (Phi-3) --------------------------------------------------------------------


def test_phi3_keeps_the_right_rows_of_fused_projections() -> None:
    model = tiny_model("phi3")
    dense = copy.deepcopy(model)
    plan = make_plan(model)
    apply_plan(model, plan)
    hd, heads, kv, inter = 16, 4, 2, 96
    group = heads // kv
    lp = plan.layers[1]
    new, old = model.model.layers[1], dense.model.layers[1]
    kept = list(lp.keep_kv_groups)
    q_rows = [g * group * hd + j for g in kept for j in range(group * hd)]
    k_rows = [heads * hd + g * hd + j for g in kept for j in range(hd)]
    v_rows = [(heads + kv) * hd + g * hd + j for g in kept for j in range(hd)]
    torch.testing.assert_close(
        new.self_attn.qkv_proj.weight, old.self_attn.qkv_proj.weight[q_rows + k_rows + v_rows]
    )
    torch.testing.assert_close(new.self_attn.o_proj.weight, old.self_attn.o_proj.weight[:, q_rows])
    channels = list(lp.keep_channels)
    gate_up = old.mlp.gate_up_proj.weight
    torch.testing.assert_close(new.mlp.gate_up_proj.weight, gate_up[channels + [inter + c for c in channels]])
    torch.testing.assert_close(new.mlp.down_proj.weight, old.mlp.down_proj.weight[:, channels])
    # the per-layer config view gives forward the pruned head counts and the model config the rest
    assert new.self_attn.config.num_attention_heads == len(kept) * group
    assert new.self_attn.config.vocab_size == model.config.vocab_size
    assert model.config.num_attention_heads == heads


def test_phi3_costs_and_report_fields_split_the_fused_weights() -> None:
    from pruning.analysis import ModelAnalyzer

    model = tiny_model("phi3")
    adapter = adapter_for(model.config)
    costs = adapter.costs(model.model.layers[0], 16)
    hidden, group = 64, 2
    assert costs.kv_group_cost == (group * 16 + 2 * 16) * hidden + group * 16 * hidden
    assert costs.channel_cost == 3 * hidden
    apply_plan(model, make_plan(model))
    layer = ModelAnalyzer(model).analyze()["layers"][1]
    attn = model.model.layers[1].self_attn
    heads, kv = attn.config.num_attention_heads, attn.config.num_key_value_heads
    assert (layer["attention"]["num_heads"], layer["attention"]["num_kv_heads"]) == (heads, kv)
    assert layer["attention"]["q_proj"] == heads * 16 * hidden
    assert layer["attention"]["k_proj"] == layer["attention"]["v_proj"] == kv * 16 * hidden
    fused = sum(p.numel() for p in attn.qkv_proj.parameters())
    assert layer["attention"]["q_proj"] + 2 * layer["attention"]["k_proj"] == fused
    assert (
        layer["mlp"]["gate_proj"]
        == layer["mlp"]["up_proj"]
        == model.model.layers[1].mlp.gate_up_proj.weight.numel() // 2
    )


def _phi3_and_its_llama_twin():
    """A Phi-3 and a Llama computing the same function: the Llama's q/k/v and gate/up are the Phi-3's
    fused weights split by hand, so its adapter (checked row by row elsewhere) is an independent oracle."""
    from transformers import LlamaConfig, LlamaForCausalLM

    phi3 = tiny_model("phi3")
    sizes = {k: getattr(phi3.config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads")}
    config = LlamaConfig(
        **sizes,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=5,
        vocab_size=128,
        rms_norm_eps=phi3.config.rms_norm_eps,
        rope_parameters=phi3.config.rope_parameters,
        pad_token_id=0,
    )
    llama = LlamaForCausalLM._from_config(config, attn_implementation="eager").eval()
    q, kv = 4 * 16, 2 * 16
    state = {}
    for name, tensor in phi3.state_dict().items():
        if "qkv_proj" in name:
            for part, rows in (
                ("q_proj", slice(0, q)),
                ("k_proj", slice(q, q + kv)),
                ("v_proj", slice(q + kv, None)),
            ):
                state[name.replace("qkv_proj", part)] = tensor[rows]
        elif "gate_up_proj" in name:
            gate, up = tensor.chunk(2)
            (
                state[name.replace("gate_up_proj", "gate_proj")],
                state[name.replace("gate_up_proj", "up_proj")],
            ) = gate, up
        else:
            state[name] = tensor
    llama.load_state_dict(state, strict=True)
    return phi3, llama


@pytest.mark.parametrize("criterion", ["magnitude", "activation", "taylor"])
def test_phi3_scores_plans_and_pruned_model_equal_its_llama_twin(criterion: str) -> None:
    from pruning.criteria.registry import get_criterion
    from pruning.planning.planner import plan_global

    phi3, llama = _phi3_and_its_llama_twin()
    ids = input_ids(batch=3, length=7)  # inside the tiny Phi-3's sliding window of 8, which Llama lacks
    with torch.no_grad():
        torch.testing.assert_close(phi3(ids).logits, llama(ids).logits, atol=1e-5, rtol=0)
    windows = input_ids(batch=4, length=7, seed=3)
    scores = [
        get_criterion(criterion).score(m, None if criterion == "magnitude" else windows)
        for m in (phi3, llama)
    ]
    for a, b in zip(scores[0].attention + scores[0].mlp, scores[1].attention + scores[1].mlp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    plans = [plan_global(m, s, 0.5) for m, s in zip((phi3, llama), scores, strict=True)]
    assert plans[0].layers == plans[1].layers and plans[0].params_planned == plans[1].params_planned
    for model, plan in zip((phi3, llama), plans, strict=True):
        apply_plan(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(phi3(ids).logits, llama(ids).logits, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in phi3.parameters()) == sum(p.numel() for p in llama.parameters())


# -- post-norms (Gemma) ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_activation_score_measures_what_passes_the_post_norm(arch: str) -> None:
    """Behind a post-norm, scaling a block's output projection changes nothing downstream, so the
    scores must not change; scaling the post-norm's gain scales what reaches the stream, so that
    layer's scores must scale by its square."""
    windows = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    model = tiny_model(arch)
    base = ActivationCriterion().score(model, windows)
    layer = model.model.layers[1]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.mul_(10.0)
    scaled = ActivationCriterion().score(model, windows)
    for before, after in zip(base.attention + base.mlp, scaled.attention + scaled.mlp, strict=True):
        torch.testing.assert_close(after, before, rtol=1e-3, atol=0)
    with torch.no_grad():
        layer.self_attn.o_proj.weight.div_(10.0)
        norm = layer.post_attention_layernorm.weight  # Gemma's post-attention norm scales by 1 + w
        norm.copy_(3.0 * (1.0 + norm) - 1.0)
    gained = ActivationCriterion().score(model, windows)
    torch.testing.assert_close(gained.attention[1], 9.0 * base.attention[1], rtol=1e-3, atol=0)
    torch.testing.assert_close(gained.attention[0], base.attention[0], rtol=1e-4, atol=0)


# -- family knowledge lives only in the adapters ----------------------------------------------------

_FAMILY_NAMES = re.compile(
    r"_proj\b|layernorm|self_attn|\b[qk]_norm|feedforward|embed_tokens|lm_head\.|inv_freq|rope_freqs|pruning_layout"
)


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def test_no_module_outside_the_adapters_names_a_projection_or_a_norm() -> None:
    package = Path(pruning.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.parent.name == "families" or path.name == "modeling_pruned.py":
            # remote_code ships inside checkpoints and cannot import the adapters; it reads the block
            # names from config.json, written from the adapters (tests/test_remote_code.py)
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            text = None
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                text = node.value
            elif isinstance(node, ast.Attribute):
                text = node.attr
            if text is not None and _FAMILY_NAMES.search(text):
                found.append(f"{path.relative_to(package)}:{node.lineno}: {textwrap.shorten(text, 60)}")
    assert not found, found
