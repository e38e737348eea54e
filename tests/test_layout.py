"""The per-layer layout (``pruning.families.layout``): the one parser of ``pruning_layout`` and the check
that a dense layer can be cut to it. Every reader of a pruned config.json goes through these two."""

from __future__ import annotations

import pytest

from pruning.families.layout import LAYOUT_KEY, LAYOUT_VERSION, LayerSizes, Layout, layout_in

# Three layers, none of whose sizes divide evenly: 6 heads over 3 KV heads, 2 over 1, a removed block.
HEADS, KV_HEADS, CHANNELS = [6, 2, 0], [3, 1, 0], [37, 0, 101]


def _layout(**changes: object) -> dict:
    data = {
        "version": LAYOUT_VERSION,
        "num_attention_heads": list(HEADS),
        "num_key_value_heads": list(KV_HEADS),
        "intermediate_size": list(CHANNELS),
    }
    return {**data, **changes}


def test_a_valid_layout_parses_to_its_layers() -> None:
    layout = Layout.parse(_layout(), 3)
    assert list(layout) == [LayerSizes(6, 3, 37), LayerSizes(2, 1, 0), LayerSizes(0, 0, 101)]
    assert layout.to_json() == _layout() and Layout.parse(layout.to_json(), 3) == layout


def test_a_layout_without_a_version_is_refused() -> None:
    """A layout that does not say its version may be of any version: reading it as version 1 would build
    whatever a later format meant by these lists."""
    data = _layout()
    del data["version"]
    with pytest.raises(ValueError, match=rf"{LAYOUT_KEY}: unsupported version None \(expected 1\)"):
        Layout.parse(data, 3)


@pytest.mark.parametrize(
    ("version", "shown"),
    [(2, "2"), (0, "0"), ("1", "'1'"), (None, "None"), ([1], r"\[1\]"), (True, "True"), (1.0, "1.0")],
)
def test_only_version_1_is_read(version: object, shown: str) -> None:
    """The string "1" is not the number 1: a hand-edited config.json must not pass for this tool's."""
    with pytest.raises(ValueError, match=rf"unsupported version {shown} \(expected 1\)"):
        Layout.parse(_layout(version=version), 3)


@pytest.mark.parametrize("data", [[6, 3, 37], None, "version 1", 1])
def test_a_layout_that_is_no_object_is_refused(data: object) -> None:
    with pytest.raises(ValueError, match=rf"{LAYOUT_KEY} must be an object, got {type(data).__name__}"):
        Layout.parse(data, 3)


@pytest.mark.parametrize(
    ("key", "values"),
    [
        ("num_attention_heads", [6, 2]),  # a layer short
        ("num_key_value_heads", [3, 1, 0, 0]),  # a layer too many
        ("intermediate_size", [37, -1, 101]),
        ("intermediate_size", [37, True, 101]),  # a bool is an int to Python, never a size
        ("num_attention_heads", [6.0, 2, 0]),
        ("num_key_value_heads", ["3", 1, 0]),
        ("intermediate_size", (37, 0, 101)),  # json.load gives lists, never tuples
        ("intermediate_size", None),
    ],
)
def test_a_list_that_is_not_one_size_per_layer_is_refused(key: str, values: object) -> None:
    with pytest.raises(ValueError, match=rf"{LAYOUT_KEY}\.{key} must be a list of 3 non-negative integers"):
        Layout.parse(_layout(**{key: values}), 3)


def test_a_missing_list_is_refused() -> None:
    data = _layout()
    del data["num_key_value_heads"]
    with pytest.raises(ValueError, match=r"num_key_value_heads must be a list of 3"):
        Layout.parse(data, 3)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "message"),
    [
        ([6, 3, 0], [4, 1, 0], "layer 0 has 6 query heads for 4 KV heads"),  # 6 is no multiple of 4
        ([6, 0, 0], [3, 1, 0], "layer 1 has 0 query heads for 1 KV heads"),
        ([6, 2, 5], [3, 1, 0], "layer 2 has 5 query heads for 0 KV heads"),
    ],
)
def test_heads_that_are_no_whole_kv_groups_are_refused(heads: list, kv_heads: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Layout.parse(_layout(num_attention_heads=heads, num_key_value_heads=kv_heads), 3)


def test_layers_cut_from_the_dense_layer_are_within_it() -> None:
    """Dense layers of 9 heads over 3 KV heads (groups of 3) and 101 channels: every layer keeps whole
    groups, and the dense sizes themselves are allowed."""
    dense = LayerSizes(9, 3, 101)
    Layout.parse(_layout(num_attention_heads=[6, 3, 0], num_key_value_heads=[2, 1, 0]), 3).check_within(dense)
    Layout.of([dense, LayerSizes(0, 0, 0), LayerSizes(3, 1, 1)]).check_within(dense)


@pytest.mark.parametrize(
    ("layers", "bad"),
    [
        ([LayerSizes(9, 3, 101), LayerSizes(12, 4, 50)], 1),  # more KV heads than the dense layer
        ([LayerSizes(9, 3, 102), LayerSizes(3, 1, 50)], 0),  # one channel more than the dense layer
        ([LayerSizes(9, 3, 101), LayerSizes(2, 1, 50)], 1),  # 2 heads over 1 KV head: not a group of 3
        ([LayerSizes(3, 3, 101), LayerSizes(3, 1, 50)], 0),  # parses (3 % 3 == 0) but groups of 1
    ],
)
def test_a_layer_no_dense_layer_could_be_cut_to_is_named(layers: list[LayerSizes], bad: int) -> None:
    layout = Layout.of(layers)
    sizes = layers[bad]
    with pytest.raises(ValueError) as info:
        layout.check_within(LayerSizes(9, 3, 101))
    assert str(info.value) == (
        f"{LAYOUT_KEY}: layer {bad}: {sizes.num_heads} heads, {sizes.num_kv_heads} KV heads and "
        f"{sizes.intermediate_size} channels cannot come from a layer of 9, 3 and 101"
    )


def test_a_config_without_a_layout_has_none_and_one_with_it_is_parsed_against_its_depth() -> None:
    assert layout_in({"num_hidden_layers": 3}) is None
    assert layout_in({"num_hidden_layers": 3, LAYOUT_KEY: {}}) is None
    assert len(layout_in({"num_hidden_layers": 3, LAYOUT_KEY: _layout()})) == 3
    with pytest.raises(ValueError, match="must be a list of 4"):
        layout_in({"num_hidden_layers": 4, LAYOUT_KEY: _layout()})


def test_a_layout_deeper_than_any_model_is_refused_before_its_lists_are_read() -> None:
    """Per-layer lists are bounded by ``MAX_LAYERS`` (10,000; the deepest published LLMs have a few
    hundred), as every other reader of a depth bounds it."""
    from pruning.families.layout import MAX_LAYERS

    deep = {"version": 1, "num_attention_heads": [4] * MAX_LAYERS}
    deep.update(num_key_value_heads=[2] * MAX_LAYERS, intermediate_size=[8] * MAX_LAYERS)
    assert len(Layout.parse(deep, 10_000)) == 10_000
    with pytest.raises(ValueError, match=f"{LAYOUT_KEY}: 10,001 layers; at most 10,000"):
        Layout.parse({"version": 1}, 10_001)


@pytest.mark.parametrize("value", [None, 3, "llama", "pruned_", ["pruned_llama"]])
def test_stock_model_type_leaves_anything_but_a_pruned_name_alone(value: object) -> None:
    from pruning.families.layout import stock_model_type

    assert stock_model_type(value) == ("" if value == "pruned_" else value)
    assert stock_model_type("pruned_qwen3") == "qwen3"
