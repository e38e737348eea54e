"""A tiny Llama GQA model directory with a real tokenizer, and helpers to run the pruning pipeline on it.

The tokenizer is a byte-level BPE (vocab 500) trained on a few KB of WikiText-2 validation text, so the
calibration stage tokenises the real file; the model (hidden 64, 4 heads, 2 KV heads, head_dim 16,
4 layers, intermediate 128) has redrawn weights (std 0.1, norms around 1) so that a wrong slice shows in
the logits.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
WIKI_VALID = REPO / "data" / "wikitext-2-raw" / "wiki.valid.raw"
VOCAB = 500
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, INTERMEDIATE = 64, 4, 2, 16, 4, 128
# Parameters one removable structure owns: a KV group (q rows, k/v rows, o columns) and an MLP channel.
KV_GROUP_COST = (2 * (HEADS // KV_HEADS) + 2) * HEAD_DIM * HIDDEN
CHANNEL_COST = 3 * HIDDEN
MAX_STRUCTURE_COST = max(KV_GROUP_COST, CHANNEL_COST)


def build_tokenizer(vocab_size: int = VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = WIKI_VALID.read_text(encoding="utf-8")[:20_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def build_tiny_model_dir(directory: Path, seed: int = 0) -> Path:
    """Save a tiny random LlamaForCausalLM (GQA) and its tokenizer to ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        num_hidden_layers=LAYERS,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.1
            param.copy_(1.0 + noise if "norm" in name else noise)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def write_config(path: Path, model_dir: Path, output_dir: Path, **sections: Any) -> Path:
    """A pipeline config for the tiny model (absolute paths, so any working directory works)."""
    config = {
        "name": "tiny",
        "model": {"path": str(model_dir), "dtype": "float32", "device_map": "cpu"},
        "calibration": {"source": str(WIKI_VALID), "num_samples": 4, "seq_len": 32, "batch_size": 2},
        "pruning": {"ratio": 0.2},
        "output": {"dir": str(output_dir)},
        "hooks": ["analysis"],
    }
    path.write_text(yaml.safe_dump(_merge(config, sections), sort_keys=False), encoding="utf-8")
    return path


def tree_digest(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``directory`` (empty dict when it does not exist)."""
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
