"""benchmarks/speed.py on tiny random Llamas: the FLOPs count against a hand computation, one tiny
measurement of a dense checkpoint and a pruned copy (transformers, and a stand-in for llama.cpp), and the
command line's GGUF sets and engines with the table they give (fake timings)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from pruning.checkpoint.save import save_pruned_model
from pruning.planning.plan import LayerPlan, PruningPlan
from pruning.planning.planner import plan_global
from pruning.planning.scores import StructureScores
from pruning.surgery import apply_plan
from tests.benchmark_modules import load_benchmark
from tests.tiny_models import NUM_LAYERS, tiny_model

ROOT = Path(__file__).resolve().parents[1]


speed = load_benchmark("speed")

# tiny_model("llama_gqa"): hidden 64, 4 query heads of 16 (2 KV heads), intermediate 96, 5 layers, vocab 128
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 64, 4, 2, 16, 96, 128


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; more only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_flops_of_the_dense_tiny_llama_by_hand() -> None:
    shapes = speed.model_shapes(tiny_model("llama_gqa"))
    q = o = HIDDEN * HEADS * HEAD_DIM  # 4096 multiply-adds per token each
    k = v = HIDDEN * KV_HEADS * HEAD_DIM  # 2048
    mlp = 3 * HIDDEN * INTER  # gate, up, down: 18432
    per_layer = q + k + v + o + mlp  # 30720
    widths = (HEADS * HEAD_DIM,) * NUM_LAYERS
    assert shapes == speed.ModelShapes(NUM_LAYERS * per_layer, HIDDEN * VOCAB, widths)

    # prefill of 8 tokens: every token through every linear layer, the head once (last position);
    # causal attention: 1 + 2 + ... + 8 = 36 (query, key) pairs, each 2 x 64 multiply-adds per layer
    macs = 8 * 153_600 + 8_192 + 36 * 2 * 64 * NUM_LAYERS
    assert speed.forward_flops(shapes, 8) == 2 * macs == 2_520_064
    assert speed.prefill_flops_per_token(shapes, 8) == 2 * macs / 8
    # decode after 8 prompt tokens, 3 new tokens: 2 steps, feeding positions 8 and 9 (9 and 10 keys)
    step = [2 * (153_600 + 8_192 + keys * 2 * 64 * NUM_LAYERS) for keys in (9, 10)]
    assert speed.forward_flops(shapes, 1, past_tokens=8) == step[0]
    assert speed.decode_flops_per_token(shapes, 8, 3) == sum(step) / 2


def test_flops_follow_the_kept_heads_and_removed_blocks() -> None:
    model = tiny_model("llama_gqa")
    plan = PruningPlan(
        layers=(
            LayerPlan(0, KV_HEADS, INTER, (0,), tuple(range(32))),  # a KV group (2 query heads), 32 channels
            LayerPlan(1, KV_HEADS, INTER),
            LayerPlan(2, KV_HEADS, INTER, (0, 1), tuple(range(INTER))),  # the whole layer
            LayerPlan(3, KV_HEADS, INTER, (), tuple(range(INTER))),  # the whole MLP
            LayerPlan(4, KV_HEADS, INTER),
        )
    )
    apply_plan(model, plan)
    shapes = speed.model_shapes(model)
    full_attention = 2 * HIDDEN * HEADS * HEAD_DIM + 2 * HIDDEN * KV_HEADS * HEAD_DIM  # 12288
    layer0 = 2 * HIDDEN * 2 * HEAD_DIM + 2 * HIDDEN * HEAD_DIM + 3 * HIDDEN * 64  # 4096 + 2048 + 12288
    layer3 = full_attention
    full = full_attention + 3 * HIDDEN * INTER  # 30720
    assert shapes.linear_macs == layer0 + full + 0 + layer3 + full == 18_432 + 30_720 + 12_288 + 30_720
    assert shapes.attention_widths == (32, 64, 0, 64, 64)
    pairs = 4 * 5 // 2  # a prompt of 4: 10 (query, key) pairs
    assert speed.forward_flops(shapes, 4) == 2 * (4 * 92_160 + 8_192 + pairs * 2 * 224)


def test_forward_flops_rejects_impossible_counts() -> None:
    shapes = speed.ModelShapes(10, 10, (4,))
    for bad in ((0, 0, 0), (2, -1, 1), (2, 0, 3)):
        with pytest.raises(ValueError):
            speed.forward_flops(shapes, *bad)
    with pytest.raises(ValueError):
        speed.decode_flops_per_token(shapes, 4, 1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny dense Llama saved as a stock checkpoint, and a 30% pruned copy saved as the pipeline saves."""
    root = tmp_path_factory.mktemp("speed")
    model = tiny_model("llama_gqa")
    model.save_pretrained(root / "dense")
    gen = torch.Generator().manual_seed(0)
    scores = StructureScores(
        attention=[torch.rand(KV_HEADS, generator=gen) for _ in range(NUM_LAYERS)],
        mlp=[torch.rand(INTER, generator=gen) for _ in range(NUM_LAYERS)],
    )
    apply_plan(model, plan_global(model, scores, 0.3))
    save_pruned_model(model, None, root / "pruned")
    return root / "dense", root / "pruned"


class FakeLlama:
    """Stands in for ``llama_cpp.Llama``: counts what the benchmark asks of it."""

    def __init__(self) -> None:
        self.resets, self.evals = 0, []

    def reset(self) -> None:
        self.resets += 1

    def eval(self, tokens: list[int]) -> None:
        self.evals.append(list(tokens))


def test_one_tiny_measurement(checkpoints: tuple[Path, Path]) -> None:
    dense_dir, pruned_dir = checkpoints
    variants = [speed.load_variant("dense", str(dense_dir)), speed.load_variant("tiny_0.3", str(pruned_dir))]
    cost_rows = speed.costs(variants, prompt_len=8, new_tokens=3)
    assert cost_rows[0]["params_removed"] == 0
    assert 0.29 < cost_rows[1]["params_removed"] < 0.32
    assert 0 < cost_rows[1]["prefill_flops_per_token_removed"] < 1
    fakes = {"dense": FakeLlama(), "tiny_0.3": FakeLlama()}
    written = []
    rows = speed.measure(
        variants,
        batch_sizes=(1, 2),
        prompt_len=8,
        new_tokens=3,
        runs=1,
        warmup=1,
        llama={"llama.cpp": fakes},
        on_row=written.append,
    )
    assert written == rows and len(rows) == 2 * (2 * 2 + 2)  # (batches x models + llama.cpp) per repetition
    assert [r["warmup"] for r in rows] == [True] * 6 + [False] * 6
    for fake in fakes.values():  # prompt in one eval after a reset, then new_tokens - 1 single tokens
        assert fake.resets == 2 and [len(t) for t in fake.evals] == [8, 1, 1] * 2
    for row in rows:
        assert row["prefill_s"] > 0 and row["decode_s"] > 0
        assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
    summary = speed.summarize(rows)
    keys = [(e["engine"], e["batch"], e["model"]) for e in summary]
    assert keys == [
        ("transformers", 1, "dense"),
        ("transformers", 1, "tiny_0.3"),
        ("transformers", 2, "dense"),
        ("transformers", 2, "tiny_0.3"),
        ("llama.cpp", 1, "dense"),
        ("llama.cpp", 1, "tiny_0.3"),
    ]
    for entry in summary:
        for phase in ("prefill", "decode"):
            stats = entry[phase]
            assert entry["runs"] == 1 and 0 < stats["min"] <= stats["median"] <= stats["max"]
            assert stats["x_dense"] > 0
            if entry["model"] == "dense":
                assert stats["x_dense"] == 1
    lines = speed.table(summary, cost_rows).splitlines()
    assert len(lines) == 2 + len(summary)
    assert lines[3].startswith("| transformers | 1 | tiny_0.3 | ")


def test_timed_regions_wait_for_the_device(
    checkpoints: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU a kernel runs after its launch returns: prefill and generate each wait for the device
    before and after, and every step's stamp waits too (counted with a stand-in for the CUDA wait)."""
    measure_module = sys.modules["speed_measure"]
    assert measure_module.synchronizer("cpu") is measure_module._nothing  # the CPU has nothing queued
    waits: list[str] = []
    monkeypatch.setattr(measure_module, "synchronizer", lambda device: lambda: waits.append(device))
    variant = speed.load_variant("dense", str(checkpoints[0]))
    assert variant.device == "cpu"
    row = measure_module.measure_transformers(variant, torch.randint(0, VOCAB, (2, 5)), new_tokens=3)
    assert waits == ["cpu"] * (2 + 2 + 3) and row["decode_s"] > 0


class FakeLlamaModule(ModuleType):
    """Stands in for the ``llama_cpp`` module: ``Llama(path, **kwargs)`` gives a ``FakeLlama``."""

    __version__ = "0.0-test"

    def __init__(self) -> None:
        super().__init__("llama_cpp")
        self.opened: list[tuple[str, dict]] = []

    def Llama(self, model_path: str, **kwargs: object) -> FakeLlama:  # noqa: N802 - llama_cpp's name
        self.opened.append((model_path, kwargs))
        return FakeLlama()


def _argv(dense_dir: Path, pruned_dir: Path, out: Path) -> list[str]:
    return [
        *("--dense", str(dense_dir), "--pruned", str(pruned_dir), "--label", "tiny"),
        *("--batch-sizes", "1,2", "--prompt-len", "6", "--new-tokens", "2"),
        *("--runs", "2", "--warmup", "0", "--threads", "1", "--out", str(out)),
    ]


@pytest.mark.parametrize("with_llama_cpp", [False, True])
def test_main_writes_the_report(
    checkpoints: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_llama_cpp: bool
) -> None:
    """The whole command: report, raw rows and meta; llama.cpp rows from a stand-in module, or the
    column skipped with a note when ``llama_cpp`` cannot be imported."""
    dense_dir, pruned_dir = checkpoints
    ggufs = [tmp_path / "dense.gguf", tmp_path / "tiny.gguf"]
    for file in ggufs:
        file.write_bytes(b"GGUF")
    fake = FakeLlamaModule()
    monkeypatch.setitem(sys.modules, "llama_cpp", fake if with_llama_cpp else None)  # None: ImportError
    out = tmp_path / "results" / "speed.md"
    argv = _argv(dense_dir, pruned_dir, out) + ["--gguf-dense", str(ggufs[0]), "--gguf-pruned", str(ggufs[1])]
    assert speed.main(argv) == 0
    text = out.read_text()
    assert "interleaved" in text and "| transformers | 2 | tiny | " in text
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    llama_rows = 2 * 2 if with_llama_cpp else 0  # 2 models x 2 repetitions
    assert len(rows) == 2 * 2 * 2 + llama_rows and all(r["decode_tok_s"] > 0 for r in rows)
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["torch_threads"] == 1 and meta["versions"]["torch"] == torch.__version__
    assert [c["model"] for c in meta["costs"]] == ["dense", "tiny"]
    if with_llama_cpp:
        assert [path for path, _ in fake.opened] == [str(f) for f in ggufs]
        assert fake.opened[0][1] == {
            "n_ctx": 8,
            "n_threads": 1,
            "n_threads_batch": 1,
            "n_batch": 6,
            "logits_all": False,
            "verbose": False,
        }
        assert "| llama.cpp | 1 | tiny | " in text and "llama-cpp-python 0.0-test" in text
    else:
        assert "llama.cpp: skipped" in text and "| llama.cpp |" not in text


# ------------------------------------------------------------------ GGUF sets, engines, report grouping


def _parse(*extra: str) -> argparse.Namespace:
    return speed.parse_args(["--pruned", "r/a/models", "--pruned", "r/b/models", *extra])


def _files(tmp_path: Path, *names: str) -> list[str]:
    for name in names:
        (tmp_path / name).write_bytes(b"GGUF")
    return [str(tmp_path / name) for name in names]


def test_gguf_sets_labelled_by_type(tmp_path: Path) -> None:
    """Each type is a set of its own, paired with the models in --pruned order however the types are
    interleaved on the command line; llama.cpp joins the engines by default."""
    d16, d8, a16, a8, b16, b8 = _files(tmp_path, "d16", "d8", "a16", "a8", "b16", "b8")
    args = _parse(
        *("--gguf-dense", f"f16={d16}", "--gguf-pruned", f"q8_0={a8}", "--gguf-pruned", f"f16={a16}"),
        *("--gguf-dense", f"q8_0={d8}", "--gguf-pruned", f"f16={b16}", "--gguf-pruned", f"q8_0={b8}"),
    )
    assert args.labels == ["a", "b"]
    assert args.gguf == {
        "llama.cpp f16": {"dense": d16, "a": a16, "b": b16},
        "llama.cpp q8_0": {"dense": d8, "a": a8, "b": b8},
    }
    assert args.engines == ["transformers", "llama.cpp"]


def test_unlabelled_gguf_files_are_one_set(tmp_path: Path) -> None:
    dense, a, b = _files(tmp_path, "dense=1.gguf", "a.gguf", "b.gguf")  # '=' after a '/': still a path
    args = _parse("--gguf-dense", dense, "--gguf-pruned", a, "--gguf-pruned", b)
    assert args.gguf == {"llama.cpp": {"dense": dense, "a": a, "b": b}}
    assert _parse("--gguf-pruned", a, "--gguf-pruned", b).gguf == {"llama.cpp": {"a": a, "b": b}}
    assert _parse().gguf == {} and _parse().engines == ["transformers"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gguf-dense", "f16=d", "--gguf-pruned", "a", "--gguf-pruned", "b"], "label every GGUF file"),
        (["--gguf-dense", "d", "--gguf-dense", "e"], "more than once without TYPE="),
        (["--gguf-dense", "d", "--gguf-pruned", "a"], "give one per --pruned"),
        (["--gguf-pruned", "q8_0=a", "--gguf-pruned", "q8_0=b"], r"--gguf-dense q8_0=FILE: .*got none"),
        (
            [
                "--gguf-dense",
                "f16=d",
                "--gguf-dense",
                "f16=e",
                "--gguf-pruned",
                "f16=a",
                "--gguf-pruned",
                "f16=b",
            ],
            r"--gguf-dense f16=FILE: give exactly one \(got 2 files\)",
        ),
        (
            [
                "--gguf-dense",
                "f16=d",
                "--gguf-dense",
                "q8_0=e",
                "--gguf-pruned",
                "f16=a",
                "--gguf-pruned",
                "f16=b",
            ],
            "--gguf-pruned q8_0=FILE: got 0 for 2 --pruned",
        ),
        (["--gguf-dense", "f16="], "--gguf-dense f16=: no file after"),
        (["--gguf-dense", "missing.gguf"], "GGUF file missing.gguf does not exist"),
    ],
)
def test_a_bad_gguf_pairing_is_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        _parse(*argv)


def test_engines_and_device(tmp_path: Path) -> None:
    dense, a, b = _files(tmp_path, "d", "a", "b")
    gguf = ("--gguf-dense", dense, "--gguf-pruned", a, "--gguf-pruned", b)
    assert _parse(*gguf, "--engines", "llama.cpp").engines == ["llama.cpp"]
    assert _parse(*gguf, "--engines", " llama.cpp, transformers").engines == ["llama.cpp", "transformers"]
    args = _parse("--engines", "transformers", "--device", "cuda:1", "--batch-sizes", "1,8,32")
    assert (args.engines, args.device, args.batch_sizes) == (["transformers"], "cuda:1", [1, 8, 32])
    bad = [
        (("--engines", "vllm"), "choose from transformers, llama.cpp"),
        (("--engines", ","), "choose from"),
        (("--engines", "llama.cpp"), "give its GGUF files"),
        ((*gguf, "--engines", "transformers"), "llama.cpp is not among the engines"),
        ((*gguf, "--engines", "llama.cpp", "--device", "cuda"), "which --engines llama.cpp leaves out"),
        (("--device", "gpu"), "expected cpu, cuda or cuda:N"),
        (("--batch-sizes", "1,x"), "comma list of integers"),
    ]
    for argv, message in bad:
        with pytest.raises(SystemExit, match=message):
            _parse(*argv)


def _rows(engine: str, model: str, prefill: list[float], decode: list[float]) -> list[dict]:
    return [
        {"engine": engine, "batch": 1, "model": model, "warmup": False, "prefill_tok_s": p, "decode_tok_s": d}
        for p, d in zip(prefill, decode, strict=True)
    ]


def test_each_gguf_type_has_its_own_dense() -> None:
    """Interleaved rows of two llama.cpp types: each pruned median over its own type's dense median."""
    rows = [
        {
            "engine": "llama.cpp f16",
            "batch": 1,
            "model": "dense",
            "warmup": True,
            "prefill_tok_s": 1e9,
            "decode_tok_s": 1e9,
        },  # fmt: skip
        *_rows("llama.cpp f16", "dense", [100, 110, 90], [50, 40, 60]),
        *_rows("llama.cpp f16", "tiny", [150, 120, 130], [60, 70, 80]),
        *_rows("llama.cpp q8_0", "dense", [200, 200, 200], [100, 100, 100]),
        *_rows("llama.cpp q8_0", "tiny", [300, 250, 260], [125, 125, 125]),
    ]
    summary = speed.summarize(rows)
    got = {
        (e["engine"], e["model"]): (e["runs"], e["prefill"]["x_dense"], e["decode"]["x_dense"])
        for e in summary
    }
    assert got == {
        ("llama.cpp f16", "dense"): (3, 1, 1),
        ("llama.cpp f16", "tiny"): (3, 1.3, 1.4),
        ("llama.cpp q8_0", "dense"): (3, 1, 1),
        ("llama.cpp q8_0", "tiny"): (3, 1.3, 1.25),
    }
    cost_rows = [
        {"model": m, "params_removed": r, "prefill_flops_per_token": f, "decode_flops_per_token": f}
        for m, r, f in (("dense", 0.0, 100.0), ("tiny", 0.2, 80.0))
    ]
    lines = speed.table(summary, cost_rows).splitlines()[2:]
    assert [line.split(" | ")[:3] for line in lines] == [
        ["| llama.cpp f16", "1", "dense"],
        ["| llama.cpp f16", "1", "tiny"],
        ["| llama.cpp q8_0", "1", "dense"],
        ["| llama.cpp q8_0", "1", "tiny"],
    ]
    assert lines[1].split(" | ")[4:7] == ["130 (120-150)", "1.30", "1.25"]
    assert lines[3].split(" | ")[4:7] == ["260 (250-300)", "1.30", "1.25"]


def test_main_times_two_gguf_types_without_transformers(
    checkpoints: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--engines llama.cpp with an f16 and a q8_0 set: every repetition runs both types' models in turn,
    and the report names both engines and no transformers row."""
    dense_dir, pruned_dir = checkpoints
    d16, d8, t16, t8 = _files(tmp_path, "d16", "d8", "t16", "t8")
    fake = FakeLlamaModule()
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    out = tmp_path / "speed.md"
    argv = _argv(dense_dir, pruned_dir, out) + [
        *("--engines", "llama.cpp", "--gguf-dense", f"f16={d16}", "--gguf-dense", f"q8_0={d8}"),
        *("--gguf-pruned", f"f16={t16}", "--gguf-pruned", f"q8_0={t8}"),
    ]
    assert speed.main(argv) == 0
    assert [path for path, _ in fake.opened] == [d16, t16, d8, t8]
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    order = [(r["rep"], r["engine"], r["model"]) for r in rows]
    assert order == [
        (rep, engine, model)
        for rep in (0, 1)
        for engine in ("llama.cpp f16", "llama.cpp q8_0")
        for model in ("dense", "tiny")
    ]
    text = out.read_text()
    assert "| llama.cpp f16 | 1 | tiny | " in text and "| llama.cpp q8_0 | 1 | dense | " in text
    assert "| transformers |" not in text and "(llama.cpp f16, llama.cpp q8_0: one GGUF set each)" in text
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["engines"] == ["llama.cpp"] and meta["gguf"]["llama.cpp q8_0"] == {"dense": d8, "tiny": t8}
