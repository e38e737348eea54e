"""The whole pipeline in-process on a tiny Llama GQA model with a real tokenizer (no real model needed)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import pruning
from pruning import reports
from pruning.cli import main
from pruning.planning.plan import PruningPlan
from tests.oracle import zero_plan_structures
from tests.tiny_pipeline import (
    CHANNEL_COST,
    HEAD_DIM,
    HIDDEN,
    KV_GROUP_COST,
    MAX_STRUCTURE_COST,
    VOCAB,
    build_tiny_model_dir,
    tree_digest,
    write_config,
)

REPORTS = ("original_model_analysis.json", "pruned_model_analysis.json", "model_comparison.json")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def run(config: Path, *args: str) -> int:
    return main(["--config", str(config), *args])


def prune(tmp_path: Path, model_dir: Path, name: str = "run", *args: str, **sections) -> SimpleNamespace:
    """Write a config, run the CLI in-process, return exit code, output dir and (if any) run.json."""
    out = tmp_path / name
    config = write_config(tmp_path / f"{name}.yaml", model_dir, out, **sections)
    code = run(config, *args)
    record = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else None
    plan = json.loads((out / "plan.json").read_text()) if (out / "plan.json").is_file() else None
    return SimpleNamespace(code=code, out=out, config=config, record=record, plan=plan)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> SimpleNamespace:
    """One activation run at 20% of all parameters, with the source directory hashed around it."""
    before = tree_digest(tiny_dir)
    result = prune(tmp_path_factory.mktemp("baseline"), tiny_dir)
    result.source_before, result.source_after = before, tree_digest(tiny_dir)
    return result


def removed_within_one_structure(record: dict, base_key: str, plan: dict) -> None:
    """Removal reaches the target and overshoots it by less than one structure (plus the norm of a block
    that lost every structure, which goes with it)."""
    emptied = len(plan["extra"]["attention_blocks_removed"]) + len(plan["extra"]["mlp_blocks_removed"])
    target = record["target_ratio"] * record[base_key]
    removed = record["params_before"] - record["params_after"]
    assert target <= removed < target + MAX_STRUCTURE_COST + emptied * HIDDEN, (removed, target)


def test_structure_costs_match_the_planner(tiny_dir: Path):
    from transformers import LlamaForCausalLM

    from pruning.families import adapter_for

    model = LlamaForCausalLM.from_pretrained(tiny_dir)
    costs = adapter_for(model.config).costs(model.model.layers[0], HEAD_DIM)
    assert (costs.kv_group_cost, costs.channel_cost) == (KV_GROUP_COST, CHANNEL_COST)
    assert (costs.num_kv_groups, costs.num_channels) == (2, 128)


def test_run_succeeds_and_writes_every_output(baseline: SimpleNamespace):
    assert baseline.code == 0
    out = baseline.out
    assert sorted(p.name for p in out.iterdir()) == ["analysis", "models", "plan.json", "run.json"]
    assert sorted(p.name for p in (out / "analysis").iterdir()) == sorted(REPORTS)
    assert (out / "models" / "model.safetensors").is_file()
    assert (out / "models" / "tokenizer.json").is_file()
    assert not list(out.rglob("*.bin")) and not list(out.rglob(".*"))  # no pickles, no leftovers


def test_reports_are_valid_and_agree(baseline: SimpleNamespace):
    original, pruned, comparison = (reports.load(baseline.out / "analysis" / name) for name in REPORTS)
    record = baseline.record
    assert original["total_params"] == record["params_before"]
    assert pruned["total_params"] == record["params_after"]
    assert comparison["total_params"]["original"] == record["params_before"]
    assert comparison["total_params"]["reduced"] == record["params_removed"]
    assert comparison["layer_params"]["pruned"] == record["layer_params_after"]


def test_run_record(baseline: SimpleNamespace):
    record = baseline.record
    assert record["name"] == "tiny" and record["config_file"] == str(baseline.config)
    assert record["config"]["pruning"] == {
        "ratio": 0.2,
        "ratio_of": "total",
        "importance": "activation",
        "protected_layers": [],
        "min_kv_groups": 0,
        "min_channels": 0,
        "uniform": False,
        "multiple_of": 1,
        "heads_multiple_of": 1,
    }
    assert list(record["timings_s"]) == ["load", "tokenize", "score", "plan", "prune", "save"]
    assert record["target_ratio"] == 0.2 and record["ratio_of"] == "total"
    assert record["params_removed"] == record["params_before"] - record["params_after"] > 0
    assert record["achieved_ratio"] == pytest.approx(record["params_removed"] / record["params_before"])
    removed_within_one_structure(record, "params_before", baseline.plan)
    assert record["outputs"]["analysis"] == str(baseline.out / "analysis")


def test_params_after_equals_the_saved_checkpoint(baseline: SimpleNamespace):
    model = pruning.load_pruned_model(baseline.out / "models")
    assert sum(p.numel() for p in model.parameters()) == baseline.record["params_after"]
    layout = json.loads((baseline.out / "models" / "config.json").read_text())["pruning_layout"]
    plan = PruningPlan.from_dict(baseline.plan)
    assert layout["intermediate_size"] == [lp.num_channels - len(lp.remove_channels) for lp in plan.layers]


def test_pruned_model_equals_dense_model_with_plan_zeroed(baseline: SimpleNamespace, tiny_dir: Path):
    from transformers import LlamaForCausalLM

    pruned = pruning.load_pruned_model(baseline.out / "models")
    dense = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense_logits = dense(ids).logits
        zero_plan_structures(dense, PruningPlan.from_dict(baseline.plan))
        zeroed_logits = dense(ids).logits
        pruned_logits = pruned(ids).logits
    assert not torch.allclose(dense_logits, zeroed_logits, atol=1e-3)  # the plan changes the function
    torch.testing.assert_close(pruned_logits, zeroed_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["phi3", "gemma2", "gemma3", "qwen2"])
def test_every_family_prunes_end_to_end(arch: str, tmp_path: Path):
    """The whole run on a tiny model of each family: the saved model reloads and equals the dense model
    with the plan's structures zeroed, and the reports count what was removed."""
    from tests.tiny_models import tiny_model
    from tests.tiny_pipeline import build_tokenizer

    tokenizer = build_tokenizer()
    dense = tiny_model(arch, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model_dir = tmp_path / arch
    dense.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    result = prune(tmp_path, model_dir, pruning={"ratio": 0.25})
    assert result.code == 0
    comparison = reports.load(result.out / "analysis" / "model_comparison.json")
    removed = result.record["params_before"] - result.record["params_after"]
    assert comparison["total_params"]["reduced"] == removed > 0.25 * result.record["params_before"]
    pruned = pruning.load_pruned_model(result.out / "models")
    assert sum(p.numel() for p in pruned.parameters()) == result.record["params_after"]
    ids = torch.randint(0, len(tokenizer), (3, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        zero_plan_structures(dense, PruningPlan.from_dict(result.plan))
        torch.testing.assert_close(pruned(ids).logits, dense(ids).logits, atol=1e-4, rtol=0)


def test_checkpoint_is_sharded_at_max_shard_size(tmp_path: Path, tiny_dir: Path, baseline: SimpleNamespace):
    """Shards of at most output.max_shard_size, an index naming them, and the same model as one file."""
    from safetensors import safe_open

    sharded = prune(tmp_path, tiny_dir, output={"max_shard_size": "100KB"})
    assert sharded.code == 0 and sharded.plan == baseline.plan
    models = sharded.out / "models"
    shards = sorted(models.glob("*.safetensors"))
    assert len(shards) >= 3 and (models / "model.safetensors.index.json").is_file()
    for shard in shards:
        with safe_open(shard, "pt") as f:
            if len(list(f.keys())) > 1:  # a shard of several tensors stays within the limit
                assert shard.stat().st_size <= 100_000 + 10_000  # plus the header
    one, many = pruning.load_pruned_model(baseline.out / "models"), pruning.load_pruned_model(models)
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(one(ids).logits, many(ids).logits)


def test_source_model_directory_is_untouched(baseline: SimpleNamespace, tiny_dir: Path):
    assert baseline.source_before and baseline.source_before == baseline.source_after
    assert "model.safetensors" in baseline.source_after


def test_ratio_of_layers_differs_from_total(tmp_path: Path, tiny_dir: Path, baseline: SimpleNamespace):
    layers = prune(tmp_path, tiny_dir, "layers", pruning={"ratio_of": "layers"})
    assert layers.code == 0
    record, total = layers.record, baseline.record
    assert record["ratio_of"] == "layers"
    removed_within_one_structure(record, "layer_params_before", layers.plan)
    assert record["params_removed"] < total["params_removed"]  # 20% of the layers < 20% of everything
    assert record["achieved_layer_ratio"] < total["achieved_layer_ratio"]


def removal_sets(plan: dict) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(tuple(lp["remove_kv_groups"]), tuple(lp["remove_channels"])) for lp in plan["layers"]]


@pytest.mark.parametrize("criterion", ["taylor", "magnitude", "obs_fisher"])
def test_other_importance_criteria(tmp_path: Path, tiny_dir: Path, baseline: SimpleNamespace, criterion: str):
    result = prune(tmp_path, tiny_dir, criterion, pruning={"importance": criterion})
    assert result.code == 0
    assert result.plan["criterion"] == criterion and baseline.plan["criterion"] == "activation"
    removed_within_one_structure(result.record, "params_before", result.plan)
    assert removal_sets(result.plan) != removal_sets(baseline.plan)
    reports.load(result.out / "analysis" / "model_comparison.json")
    model = pruning.load_pruned_model(result.out / "models")
    assert sum(p.numel() for p in model.parameters()) == result.record["params_after"]


def test_second_run_needs_overwrite(tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture):
    first = prune(tmp_path, tiny_dir, "again", pruning={"importance": "magnitude"})
    assert first.code == 0 and (first.out / "analysis").is_dir()
    before = tree_digest(first.out)
    capsys.readouterr()

    assert run(first.config) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output.dir ") and "output.overwrite" in err
    assert tree_digest(first.out) == before

    # Overwriting clears the previous run: without hooks this run writes no analysis/.
    code = run(
        first.config, "--set", "output.overwrite=true", "--set", "hooks=[]", "--set", "pruning.ratio=0.3"
    )
    assert code == 0
    record = json.loads((first.out / "run.json").read_text())
    assert record["target_ratio"] == 0.3 and record["config"]["hooks"] == []
    assert sorted(p.name for p in first.out.iterdir()) == ["models", "plan.json", "run.json"]


def test_output_dir_with_unrelated_files_is_refused(tmp_path: Path, tiny_dir: Path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "run.json").write_text("{}")
    before = tree_digest(out)
    config = write_config(tmp_path / "busy.yaml", tiny_dir, out, output={"overwrite": True})
    assert run(config) == 2
    err = capsys.readouterr().err
    assert "run.json is not a valid run record" in err and "refusing to overwrite" in err
    assert tree_digest(out) == before


def test_output_dir_inside_the_source_model_is_refused(tmp_path: Path, tiny_dir: Path, capsys):
    before = tree_digest(tiny_dir)
    config = write_config(tmp_path / "inside.yaml", tiny_dir, tiny_dir / "pruned")
    assert run(config) == 2
    assert "overlap; the source is never modified" in capsys.readouterr().err
    assert tree_digest(tiny_dir) == before and not (tiny_dir / "pruned").exists()


def test_source_model_inside_the_output_dir_is_refused(tmp_path: Path, tiny_dir: Path, capsys):
    """overwrite: true clears a previous run's models/; a source model living there must not go with it."""
    import shutil

    out = tmp_path / "work"
    shutil.copytree(tiny_dir, out / "models")
    before = tree_digest(out)
    config = write_config(tmp_path / "outer.yaml", out / "models", out, output={"overwrite": True})
    assert run(config) == 2
    assert "overlap" in capsys.readouterr().err
    assert tree_digest(out) == before


def test_pickled_weights_are_never_loaded(tmp_path: Path, tiny_dir: Path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    model_dir = tmp_path / "pickled"
    shutil.copytree(tiny_dir, model_dir)
    weights = model_dir / "model.safetensors"
    torch.save(load_file(weights), model_dir / "pytorch_model.bin")
    weights.unlink()
    config = write_config(tmp_path / "pickled.yaml", model_dir, tmp_path / "out")
    assert run(config) == 2
    err = capsys.readouterr().err
    assert "holds only pickled weights (pytorch_model.bin)" in err and "trust_pickle" in err
    assert not (tmp_path / "out").exists()


def test_output_dir_flag_is_a_plain_string(tmp_path: Path, tiny_dir: Path, monkeypatch):
    """--output-dir is not parsed as YAML: a date-like name stays a directory name."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "date.yaml", tiny_dir, tmp_path / "ignored")
    assert run(config, "--output-dir", "2024-05-01") == 0
    assert (tmp_path / "2024-05-01" / "run.json").is_file()


def test_protected_layers_are_untouched(tmp_path: Path, tiny_dir: Path):
    from safetensors.torch import load_file

    result = prune(tmp_path, tiny_dir, "protected", pruning={"ratio": 0.3, "protected_layers": [0, 3]})
    assert result.code == 0
    removed = removal_sets(result.plan)
    assert removed[0] == ((), ()) and removed[3] == ((), ())
    assert removed[1] != ((), ()) and removed[2] != ((), ())
    removed_within_one_structure(result.record, "params_before", result.plan)

    dense = load_file(tiny_dir / "model.safetensors")
    pruned = pruning.load_pruned_model(result.out / "models").state_dict()
    for idx in (0, 3):
        keys = sorted(k for k in dense if k.startswith(f"model.layers.{idx}."))
        assert len(keys) == 9  # 4 attention + 3 MLP projections + 2 norms
        for key in keys:
            assert torch.equal(pruned[key], dense[key]), key
    for idx in (1, 2):
        prefix = f"model.layers.{idx}."
        size = sum(v.numel() for k, v in pruned.items() if k.startswith(prefix))
        assert size < sum(v.numel() for k, v in dense.items() if k.startswith(prefix))


def test_no_pickle_is_ever_opened_without_trust(tmp_path: Path, tiny_dir: Path, capsys, monkeypatch):
    """An index naming a .bin would make transformers torch.load it; nothing may get that far."""
    import shutil

    from safetensors.torch import load_file

    opened = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a) or real_load(*a, **k))
    model_dir = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    state = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    torch.save(state, model_dir / "pytorch_model.bin")
    index = {"metadata": {}, "weight_map": dict.fromkeys(state, "pytorch_model.bin")}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    config = write_config(tmp_path / "c.yaml", model_dir, tmp_path / "out")
    assert run(config) == 2
    assert "points at pickled weights (pytorch_model.bin)" in capsys.readouterr().err
    assert opened == [] and not (tmp_path / "out").exists()
    assert run(config, "--set", "model.trust_pickle=true") == 0  # the user's explicit consent opens it
    assert opened and (tmp_path / "out" / "run.json").is_file()


def test_config_transformers_cannot_build_is_one_line(tmp_path: Path, tiny_dir: Path, capsys):
    import shutil

    model_dir = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    config = json.loads((model_dir / "config.json").read_text())
    config["hidden_act"] = "nope"
    (model_dir / "config.json").write_text(json.dumps(config))
    assert run(write_config(tmp_path / "c.yaml", model_dir, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "transformers cannot load the model in" in err[0] and "KeyError" in err[0]
    assert not (tmp_path / "out").exists()


def test_hook_permission_error_names_the_hook(tmp_path: Path, tiny_dir: Path, capsys):
    (tmp_path / "perm_hooks.py").write_text(
        "class Denied:\n"
        "    def after_prune(self, context, **kwargs):\n"
        "        raise PermissionError(13, 'Permission denied', '/var/log/metrics')\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        config = write_config(tmp_path / "c.yaml", tiny_dir, tmp_path / "out", hooks=["perm_hooks:Denied"])
        assert run(config) == 1
    finally:
        sys.path.remove(str(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: hook 'perm_hooks:Denied' failed at after_prune: PermissionError")
    assert not (tmp_path / "out").exists()


def test_a_hub_download_brings_no_pickle_and_is_checked_like_a_local_model(tmp_path, tiny_dir, monkeypatch):
    """No hub here: the download is replaced by a copy of a model whose index names a .bin file."""
    import fnmatch
    import shutil

    import huggingface_hub
    from safetensors.torch import load_file

    from pruning.config import ModelConfig
    from pruning.errors import UserError
    from pruning.pipeline.preflight import local_source

    asked = {}

    def fake_snapshot_download(repo_id: str, allow_patterns=None) -> str:
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        local = Path(shutil.copytree(tiny_dir, tmp_path / "snapshot"))
        state = load_file(local / "model.safetensors")
        (local / "model.safetensors").unlink()
        index = {"metadata": {}, "weight_map": dict.fromkeys(state, "pytorch_model.bin")}
        (local / "model.safetensors.index.json").write_text(json.dumps(index))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(UserError, match="points at pickled weights"):
        local_source(ModelConfig(path="org/model"), "org/model")
    assert asked["repo_id"] == "org/model"
    for name in ("pytorch_model.bin", "model.pt", "weights.ckpt"):
        assert not any(fnmatch.fnmatch(name, pattern) for pattern in asked["patterns"])
    assert any(fnmatch.fnmatch("model-00001-of-00002.safetensors", p) for p in asked["patterns"])


def _saved_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from pruning.storage.weight_files import find_weight_files

    tensors: dict[str, torch.Tensor] = {}
    for file in find_weight_files(out / "models").safetensors:
        tensors.update(load_file(file))
    return tensors


def _same_run(a: SimpleNamespace, b: SimpleNamespace) -> None:
    """The same plan, the same tensors bit for bit, the same config.json and the same reports."""
    assert a.code == b.code == 0
    assert a.plan == b.plan
    ta, tb = _saved_tensors(a.out), _saved_tensors(b.out)
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    config = [json.loads((r.out / "models" / "config.json").read_text()) for r in (a, b)]
    assert config[0] == config[1]
    for name in REPORTS:
        ra, rb = (reports.load(r.out / "analysis" / name) for r in (a, b))
        for report in (ra, rb):
            report.pop("timestamp", None)
        assert ra == rb, name
    assert (a.record["params_before"], a.record["params_after"]) == (
        b.record["params_before"],
        b.record["params_after"],
    )


@pytest.mark.parametrize(
    "device_map",
    [
        {"": "cpu", "model.layers.1": "disk", "model.layers.3": "disk"},  # some layers offloaded to disk
        {"": "disk", "model.layers.0": "cpu"},  # embeddings, head and most layers on disk
        {"": "cpu"},  # every part on the CPU, by an explicit map
    ],
)
def test_a_cpu_and_disk_device_map_gives_the_plain_run(
    tmp_path: Path, tiny_dir: Path, baseline: SimpleNamespace, device_map: dict
):
    _same_run(baseline, prune(tmp_path, tiny_dir, model={"device_map": device_map}))


def test_a_streamed_run_gives_the_plain_run_and_writes_each_layer_as_it_goes(
    tmp_path: Path, tiny_dir: Path, baseline: SimpleNamespace
):
    streamed = prune(tmp_path, tiny_dir, model={"streaming": "always"}, output={"max_shard_size": "100KB"})
    _same_run(baseline, streamed)
    assert len(list((streamed.out / "models").glob("model-*.safetensors"))) >= 3
    assert set(streamed.record["timings_s"]) == {"load", "tokenize", "score", "plan", "prune", "save"}


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"pruning": {"ratio": 0.2, "importance": "taylor"}}, "taylor needs a backward"),
        ({"calibration": {"engine": "whole_model"}}, "whole_model needs every weight in memory"),
        (
            {"pruning": {"ratio": 0.2, "importance": "obs_fisher"}, "calibration": {"engine": "whole_model"}},
            "whole_model needs every weight in memory",
        ),
    ],
)
def test_what_cannot_stream_says_so_before_any_weight_is_read(
    tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture, monkeypatch, sections: dict, message: str
):
    from pruning.storage import shards

    def trap(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(shards.ShardReader, "read", trap)
    result = prune(tmp_path, tiny_dir, model={"streaming": "always"}, **sections)
    err = capsys.readouterr().err
    assert result.code == 2 and message in err and "streaming always" in err
    assert len(err.strip().splitlines()) == 1 and not result.out.exists()


def test_a_streamed_default_criterion_run_gives_the_in_memory_run(tmp_path: Path, tiny_dir: Path) -> None:
    """The default's criterion, refit and selection (obs_fisher, its Fisher backward layer by layer in
    reverse) stream: the same plan, tensors and reports as in memory."""
    sections = {
        "pruning": {"ratio": 0.2, "importance": "obs_fisher"},
        "calibration": {"fisher_samples": 3},
        "compensation": {"method": "refit", "selection": "obs"},
    }
    in_memory = prune(tmp_path, tiny_dir, "memory", **sections)
    streamed = prune(tmp_path, tiny_dir, "streamed", model={"streaming": "always"}, **sections)
    assert streamed.record["placement"]["streamed"] and not in_memory.record["placement"]["streamed"]
    _same_run(in_memory, streamed)


def test_taylor_with_gradient_checkpointing_gives_the_same_plan(
    tmp_path: Path, tiny_dir: Path, baseline: SimpleNamespace
):
    plain = prune(tmp_path, tiny_dir, "plain", pruning={"ratio": 0.2, "importance": "taylor"})
    checkpointed = prune(
        tmp_path,
        tiny_dir,
        "checkpointed",
        pruning={"ratio": 0.2, "importance": "taylor"},
        calibration={"gradient_checkpointing": True},
    )
    assert plain.code == checkpointed.code == 0
    assert plain.plan == checkpointed.plan


@pytest.mark.parametrize(
    ("model_section", "message"),
    [
        (
            {"device_map": {"": "cpu", "model.layers.1.mlp": "disk"}},
            "model.layers.1.mlp is inside model.layers.1",
        ),
        ({"device_map": {"": "cpu", "model.decoder": "disk"}}, "no module 'model.decoder'"),
        ({"device_map": {"model.layers": "disk"}}, "places nothing for model.embed_tokens"),
        ({"device_map": {"": "cpu", "model.layers.0": "disk"}, "streaming": "never"}, "streaming is never"),
    ],
)
def test_a_bad_device_map_is_one_line_before_any_weight_is_read(
    tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture, monkeypatch, model_section, message
):
    from transformers import AutoModelForCausalLM

    from pruning.storage import shards

    def trap(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(shards.ShardReader, "read", trap)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", trap)
    result = prune(tmp_path, tiny_dir, model=model_section)
    err = capsys.readouterr().err
    assert result.code == 2 and message in err and err.startswith("error: model.")
    assert len(err.strip().splitlines()) == 1 and not result.out.exists()


@pytest.fixture(scope="module")
def refit_run(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> SimpleNamespace:
    """The baseline's config with compensation."""
    return prune(tmp_path_factory.mktemp("refit"), tiny_dir, compensation={"method": "refit"})


def test_a_refit_run_keeps_the_plan_and_changes_only_output_projections(
    refit_run: SimpleNamespace, baseline: SimpleNamespace
):
    assert refit_run.code == 0
    assert refit_run.plan["extra"].pop("selection") == "plan"  # the refit pass kept the plan's choice
    assert refit_run.plan == baseline.plan
    assert refit_run.record["config"]["compensation"] == {
        "method": "refit",
        "ridge": 0.001,
        "selection": "plan",
        "obs_steps": 128,
        "inputs": "pruned",
    }
    refit, plain = _saved_tensors(refit_run.out), _saved_tensors(baseline.out)
    assert sorted(refit) == sorted(plain)
    changed = {k for k in refit if not torch.equal(refit[k], plain[k])}
    assert changed and all(k.endswith(("o_proj.weight", "down_proj.weight")) for k in changed), changed


@pytest.mark.parametrize(
    ("criterion", "selection"), [("activation", "plan"), ("refit_error", "plan"), ("obs", "obs")]
)
def test_a_streamed_refit_run_equals_the_in_memory_one(
    tmp_path: Path, tiny_dir: Path, criterion: str, selection: str
):
    sections = {
        "compensation": {"method": "refit", "selection": selection},
        "pruning": {"ratio": 0.2, "importance": criterion},
    }
    in_memory = prune(tmp_path, tiny_dir, "memory", **sections)
    streamed = prune(tmp_path, tiny_dir, "streamed", model={"streaming": "always"}, **sections)
    assert in_memory.plan["criterion"] == criterion
    assert in_memory.plan["extra"]["selection"] == selection
    _same_run(in_memory, streamed)


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        (
            {"source": "builtin:poetry"},
            "calibration.source: unknown built-in text 'builtin:poetry': known are",
        ),
        ({"sources": [{"source": "x.raw", "weight": 1}]}, "calibration: give source (one text) or sources"),
    ],
)
def test_a_bad_calibration_text_is_one_line_before_any_weight_is_read(
    tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture, calibration: dict, message: str
):
    result = prune(tmp_path, tiny_dir, calibration=calibration)
    err = capsys.readouterr().err
    assert result.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not result.out.exists()


def test_a_streamed_refit_that_fails_reports_its_own_error_and_writes_nothing(
    tmp_path: Path, tiny_dir: Path, monkeypatch
):
    """A layer whose refit failed is never written: the run fails with the refit's error, not with a
    shard writer's complaint about an unpruned layer, and output.dir stays absent."""
    import pruning.compensation.refit as compensation
    from pruning.config import load_config
    from pruning.pipeline.run import run_pipeline

    calls = []

    def failing_refit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("refit failed here")
        return real_refit(*args, **kwargs)

    real_refit = compensation.ridge_refit
    monkeypatch.setattr(compensation, "ridge_refit", failing_refit)
    out = tmp_path / "run"
    config = write_config(
        tmp_path / "c.yaml", tiny_dir, out, model={"streaming": "always"}, compensation={"method": "refit"}
    )
    with pytest.raises(RuntimeError, match="refit failed here"):
        run_pipeline(load_config(config))
    assert len(calls) == 2 and not out.exists()
