"""GGUF export (pruning.export.gguf): layout, stand-ins, rotary permutation, tokenizer, refusals; and, where
llama-cpp-python is installed, llama.cpp's own logits against transformers' on pruned tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from pruning.checkpoint.load import load_pruned_model
from pruning.checkpoint.save import save_pruned_model
from pruning.errors import UserError
from pruning.export import llamacpp
from pruning.export.gguf import NONE, REAL, ZERO, export_gguf, gguf_layers, rotary_permute
from pruning.families.layout import LayerSizes
from pruning.planning.plan import LayerPlan, PruningPlan
from pruning.planning.planner import plan_global
from pruning.planning.rounding import KeptShape
from pruning.surgery import apply_plan
from tests.test_pipeline import prune
from tests.tiny_models import make_plan, tiny_model
from tests.tiny_pipeline import build_tiny_model_dir, build_tokenizer

VOCAB = 300


def saved(tmp_path: Path, arch: str, plan_kind: str = "nonuniform") -> Path:
    model = tiny_model(arch, vocab_size=VOCAB)
    if plan_kind == "nonuniform":
        apply_plan(model, make_plan(model))
    elif plan_kind == "last_empty":  # llama.cpp picks the output rows in the last layer: it must run
        plan = make_plan(model)
        last = plan.layers[-1]
        emptied = LayerPlan(
            last.layer_idx, last.num_kv_groups, last.num_channels,
            tuple(range(last.num_kv_groups)), tuple(range(last.num_channels)),
        )  # fmt: skip
        apply_plan(model, PruningPlan(layers=(*plan.layers[:-1], emptied)))
    elif plan_kind == "uniform":
        scores = random_scores_for(model)
        apply_plan(model, plan_global(model, scores, 0.2, shape=KeptShape(uniform=True)))
    return save_pruned_model(model, build_tokenizer(VOCAB), tmp_path / f"{arch}-{plan_kind}")


def random_scores_for(model: torch.nn.Module):
    from pruning.planning.scores import StructureScores

    gen = torch.Generator().manual_seed(0)
    config = model.config
    layers = config.num_hidden_layers
    return StructureScores(
        attention=[torch.rand(config.num_key_value_heads, generator=gen) + 0.1 for _ in range(layers)],
        mlp=[torch.rand(config.intermediate_size, generator=gen) + 0.1 for _ in range(layers)],
    )


def read(path: Path) -> tuple[dict[str, object], dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(path)
    fields = {
        name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer")
    }
    return fields, {t.name: t for t in reader.tensors}


def test_layers_get_zero_stand_ins_only_where_llamacpp_cannot_skip() -> None:
    sizes = [
        LayerSizes(0, 0, 10),  # layer 0 without attention: a zero KV group (head width comes from layer 0)
        LayerSizes(4, 2, 0),  # MLP gone, attention kept: a zero channel (deci would drop the attention)
        LayerSizes(0, 0, 0),  # both gone: skipped entirely
        LayerSizes(0, 0, 7),  # attention gone past layer 0: skipped
        LayerSizes(2, 1, 5),
        LayerSizes(0, 0, 0),  # the last layer, empty: a zero channel (llama.cpp picks output rows there)
    ]
    layers = gguf_layers(sizes, group_size=2)
    assert [(g.attention, g.mlp) for g in layers] == [
        (ZERO, REAL),
        (REAL, ZERO),
        (NONE, NONE),
        (NONE, REAL),
        (REAL, REAL),
        (NONE, ZERO),
    ]
    assert [(g.n_head, g.n_head_kv, g.n_ff) for g in layers] == [
        (2, 1, 10),
        (4, 2, 1),
        (0, 0, 0),
        (0, 0, 7),
        (2, 1, 5),
        (0, 0, 1),
    ]


def test_rotary_permute_turns_half_rotation_into_pair_rotation() -> None:
    """Rotating halves of q (transformers) = rotating neighbouring pairs of the permuted q (llama.cpp)."""
    heads, head_dim, hidden = 3, 8, 5
    weight = torch.randn(heads * head_dim, hidden)
    x = torch.randn(hidden)
    theta = torch.rand(head_dim // 2) * 3
    q = (weight @ x).view(heads, head_dim)
    first, second = q[:, : head_dim // 2], q[:, head_dim // 2 :]
    half = torch.cat(
        [first * theta.cos() - second * theta.sin(), second * theta.cos() + first * theta.sin()], 1
    )
    p = (rotary_permute(weight, heads) @ x).view(heads, head_dim // 2, 2)
    even, odd = p[..., 0], p[..., 1]
    pairs = torch.stack([even * theta.cos() - odd * theta.sin(), odd * theta.cos() + even * theta.sin()], -1)
    back = pairs.view(heads, head_dim // 2, 2).transpose(1, 2).reshape(heads, head_dim)
    torch.testing.assert_close(back, half)


def test_nonuniform_export_is_deci_with_per_layer_arrays(tmp_path: Path) -> None:
    checkpoint = saved(tmp_path, "llama_gqa")
    out = export_gguf(checkpoint, tmp_path / "m.gguf", dtype="f32")
    fields, tensors = read(out)
    assert fields["general.architecture"] == "deci"
    model = load_pruned_model(checkpoint)
    sizes = [
        (layer.self_attn.k_proj.out_features if hasattr(layer.self_attn, "k_proj") else 0)
        for layer in model.model.layers
    ]
    assert sizes[0] == 0 and fields["deci.attention.head_count_kv"][0] == 1  # the layer-0 stand-in
    assert fields["deci.attention.head_count_kv"][2] == 0 and fields["deci.feed_forward_length"][2] == 0
    assert fields["deci.feed_forward_length"][3] == 1  # MLP gone, attention kept: one zero channel
    assert fields["deci.attention.key_length"] == 16 and fields["deci.rope.dimension_count"] == 16
    assert not np.any(tensors["blk.0.attn_q.weight"].data) and not np.any(
        tensors["blk.3.ffn_down.weight"].data
    )
    assert "blk.2.attn_q.weight" not in tensors and "blk.2.ffn_up.weight" not in tensors
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    # q rows permuted, other weights as stored (GGUF shapes are reversed: [in, out])
    q = model.model.layers[1].self_attn.q_proj.weight.detach()
    heads = q.shape[0] // 16
    assert np.array_equal(tensors["blk.1.attn_q.weight"].data, rotary_permute(q, heads).numpy())
    down = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    assert np.array_equal(tensors["blk.1.ffn_down.weight"].data, down)


def test_uniform_export_is_plain_llama(tmp_path: Path) -> None:
    checkpoint = saved(tmp_path, "llama_gqa", "uniform")
    fields, tensors = read(export_gguf(checkpoint, tmp_path / "u.gguf", dtype="f16"))
    assert fields["general.architecture"] == "llama"
    assert isinstance(fields["llama.feed_forward_length"], int)
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_q8_0_keeps_rows_it_cannot_block_in_f16(tmp_path: Path) -> None:
    checkpoint = saved(tmp_path, "llama_gqa")
    _, tensors = read(export_gguf(checkpoint, tmp_path / "q.gguf", dtype="q8_0"))
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # 64 columns
    assert tensors["blk.3.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16  # one column


def test_tokenizer_is_written(tmp_path: Path) -> None:
    checkpoint = saved(tmp_path, "llama_gqa")
    reader = gguf.GGUFReader(export_gguf(checkpoint, tmp_path / "t.gguf"))
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == VOCAB and tokens[:2] == ["<s>", "</s>"]
    assert reader.fields["tokenizer.ggml.token_type"].contents()[0] == gguf.TokenType.CONTROL
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) > 0


def test_refusals(tmp_path: Path) -> None:
    checkpoint = saved(tmp_path, "llama_gqa")
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"user data")
    with pytest.raises(UserError, match="never replaces"):
        export_gguf(checkpoint, existing)
    assert existing.read_bytes() == b"user data"
    with pytest.raises(UserError, match="dtype"):
        export_gguf(checkpoint, tmp_path / "x.gguf", dtype="q4_k")
    phi = saved(tmp_path, "phi3")
    with pytest.raises(UserError, match="phi3 is not one of them"):
        export_gguf(phi, tmp_path / "phi.gguf")
    assert not list(tmp_path.glob(".*partial*")) and not (tmp_path / "phi.gguf").exists()


def test_a_name_taken_during_the_export_is_left_alone(tmp_path: Path) -> None:
    from pruning.export.gguf import _publish

    partial, out = tmp_path / ".m.gguf.partial", tmp_path / "m.gguf"
    partial.write_bytes(b"gguf")
    out.write_bytes(b"someone else's")
    with pytest.raises(UserError, match="left alone"):
        _publish(partial, out)
    assert out.read_bytes() == b"someone else's"


def test_gguf_hook_refuses_a_family_before_pruning(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from pruning.hooks.gguf import GgufHook

    context = SimpleNamespace(model=tiny_model("phi3"), model_path="phi", tokenizer=build_tokenizer(VOCAB))
    with pytest.raises(UserError, match="phi3 is not one of them"):
        GgufHook().before_prune(context)
    context.model = tiny_model("llama_gqa")  # 128 tokens, a tokenizer of 300: the export would refuse it
    with pytest.raises(UserError, match=r"is outside the vocabulary \(0\.\.127\)"):
        GgufHook().before_prune(context)
    context.model = tiny_model("llama_gqa", vocab_size=VOCAB)
    GgufHook().before_prune(context)  # a family it writes, with a tokenizer that fits, passes


def test_failed_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = saved(tmp_path, "llama_gqa")
    import pruning.export.gguf as module

    def broken(*args: object) -> np.ndarray:
        raise OSError("disk gone")

    monkeypatch.setattr(module, "_encode", broken)
    with pytest.raises(OSError):
        export_gguf(checkpoint, tmp_path / "out" / "m.gguf")
    assert list((tmp_path / "out").iterdir()) == []


def test_llama3_rope_factors_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pruning.export.gguf import llama3_rope_factors

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    factors = llama3_rope_factors(config.to_dict(), 128)
    torch.testing.assert_close((plain / factors.double()).float(), scaled.float(), rtol=1e-5, atol=0)


def test_cli_writes_or_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pruning.export.cli import main

    checkpoint = saved(tmp_path, "llama_gqa")
    assert main([str(checkpoint), str(tmp_path / "c.gguf"), "--dtype", "bf16"]) == 0
    assert gguf.GGUFReader(tmp_path / "c.gguf").fields["general.architecture"].contents() == "deci"
    assert main([str(checkpoint), str(tmp_path / "c.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "never replaces" in err[-1] and "Traceback" not in "".join(err)


def test_gguf_hook_exports_the_saved_checkpoint_with_the_run(tmp_path: Path) -> None:
    model_dir = build_tiny_model_dir(tmp_path / "model")
    result = prune(tmp_path, model_dir, hooks=[{"name": "gguf", "params": {"dtype": "f32"}}])
    assert result.code == 0
    fields, tensors = read(result.out / "gguf" / "tiny-f32.gguf")
    layout = json.loads((result.out / "models" / "config.json").read_text()).get("pruning_layout")
    kv = fields[f"{fields['general.architecture']}.attention.head_count_kv"]
    assert list(np.atleast_1d(kv)) == [
        max(k, 1) if i == 0 else k for i, k in enumerate(layout["num_key_value_heads"])
    ]
    assert "gguf/tiny-f32.gguf" in result.record["files"]
    bad = prune(tmp_path, model_dir, "bad", hooks=[{"name": "gguf", "params": {"dtype": "q2"}}])
    assert bad.code == 2 and not bad.out.exists()


# ---------------------------------------------------------------------------------- llama.cpp itself


def _transformers_logits(checkpoint: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = load_pruned_model(checkpoint)
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits.float()


@pytest.mark.llamacpp
@pytest.mark.skipif(not llamacpp.available(), reason="needs llama-cpp-python (make llamacpp)")
@pytest.mark.parametrize("arch", ["llama_gqa", "llama_mha", "mistral", "qwen2"])
@pytest.mark.parametrize("plan_kind", ["nonuniform", "uniform", "dense", "last_empty"])
def test_llamacpp_logits_equal_transformers(tmp_path: Path, arch: str, plan_kind: str) -> None:
    checkpoint = saved(tmp_path, arch, plan_kind)
    out = export_gguf(checkpoint, tmp_path / "m.gguf", dtype="f32")
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(3, VOCAB, (3, 7), generator=gen)  # shorter than mistral's window of 8
    expected = _transformers_logits(checkpoint, tokens)
    runner = llamacpp.LlamaCppModel(out, n_ctx=32, threads=1)
    try:
        for row, want in zip(tokens, expected, strict=True):
            got = torch.from_numpy(runner.logits(row.tolist()))
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
            assert int(got[-1].argmax()) == int(want[-1].argmax())
        text = "The quick brown fox"
        tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint, trust_remote_code=False)
        assert runner.tokenize(text) == tokenizer.encode(text, add_special_tokens=False)
    finally:
        runner.close()
    assert math.isfinite(float(expected.sum()))


def byte_fallback_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: BPE with byte fallback, "▁" for spaces and a prepended "▁"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    from tests.tiny_pipeline import WIKI_VALID

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    tok.train_from_iterator([WIKI_VALID.read_text(encoding="utf-8")[:20_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_byte_fallback_tokenizer_is_written_as_llama(tmp_path: Path) -> None:
    vocab = 400
    model = tiny_model("mistral", vocab_size=vocab)
    apply_plan(model, make_plan(model))
    checkpoint = save_pruned_model(model, byte_fallback_tokenizer(vocab), tmp_path / "m")
    reader = gguf.GGUFReader(export_gguf(checkpoint, tmp_path / "t.gguf", dtype="f32"))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is True
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert tokens[3] == "<0x00>" and types[3] == gguf.TokenType.BYTE and types[1] == gguf.TokenType.CONTROL
    scores = fields["tokenizer.ggml.scores"]
    normal = [s for s, t in zip(scores, types, strict=True) if t == gguf.TokenType.NORMAL]
    assert normal == sorted(normal, reverse=True) and len(set(normal)) == len(normal)  # merge order
    if llamacpp.available():
        runner = llamacpp.LlamaCppModel(tmp_path / "t.gguf", n_ctx=64, threads=1)
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
            for text in ("The quick brown fox", "Pruning removes heads; ünïcode falls back to bytes."):
                assert runner.tokenize(text) == tokenizer.encode(text, add_special_tokens=False), text
        finally:
            runner.close()


def test_an_unwritable_place_or_a_broken_tokenizer_is_one_user_error(tmp_path: Path) -> None:
    checkpoint = saved(tmp_path, "llama_gqa")
    with pytest.raises(UserError, match="cannot write here"):
        export_gguf(checkpoint, checkpoint / "config.json" / "m.gguf")  # a file on the way
    (checkpoint / "tokenizer.json").write_text("{broken")
    with pytest.raises(UserError, match="tokenizer.json: not valid JSON"):
        export_gguf(checkpoint, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf.partial-*"))
