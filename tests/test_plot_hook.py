"""The plot hook: the per-layer kept shares it draws, the PNG it writes, and its one-line errors."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pruning.errors import UserError
from pruning.hooks import default_registry
from pruning.hooks.plot import (
    MISSING_MATPLOTLIB,
    REMOVED_LABEL,
    PlotHook,
    figure_size,
    profile_of,
    title_of,
)
from pruning.planning.plan import LayerPlan, PruningPlan
from pruning.storage.fs import write_bytes_atomic
from tests.test_pipeline import prune
from tests.tiny_pipeline import LAYERS, build_tiny_model_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# partial, whole attention gone, whole MLP gone, untouched
HAND_PLAN = PruningPlan(
    layers=(
        LayerPlan(0, num_kv_groups=4, num_channels=8, remove_kv_groups=(1,), remove_channels=(0, 5)),
        LayerPlan(1, num_kv_groups=4, num_channels=8, remove_kv_groups=(0, 1, 2, 3)),
        LayerPlan(2, num_kv_groups=4, num_channels=8, remove_channels=tuple(range(8))),
        LayerPlan(3, num_kv_groups=4, num_channels=8),
    )
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-plot") / "model")


def bars(figure) -> tuple[list[float], list[float]]:
    attention, mlp = figure.axes[0].containers
    return [r.get_height() for r in attention], [r.get_height() for r in mlp]


def legend_labels(figure) -> list[str]:
    return [t.get_text() for t in figure.axes[0].get_legend().get_texts()]


def test_profile_is_the_kept_share_of_each_block():
    assert profile_of(HAND_PLAN) == [(0.75, 0.75), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)]
    no_attention = PruningPlan(layers=(LayerPlan(0, num_kv_groups=0, num_channels=4, remove_channels=(1,)),))
    ((attention, mlp),) = profile_of(no_attention)
    assert math.isnan(attention) and mlp == 0.75  # nothing to keep is not drawn as kept or removed


def test_the_figure_draws_the_profile_and_marks_removed_blocks():
    figure = PlotHook().figure(HAND_PLAN, "tiny: title")
    attention, mlp = bars(figure)
    assert list(zip(attention, mlp, strict=True)) == profile_of(HAND_PLAN)
    assert figure.get_suptitle() == "tiny: title"
    assert REMOVED_LABEL in legend_labels(figure)
    (marks,) = [line for line in figure.axes[0].get_lines() if line.get_label() == REMOVED_LABEL]
    assert marks.get_marker() == "x"
    # one mark under layer 1's attention bar and one under layer 2's MLP bar, at zero
    assert list(marks.get_xdata()) == [1 - 0.2, 2 + 0.2] and list(marks.get_ydata()) == [0.0, 0.0]


def test_no_removed_block_no_mark():
    plan = PruningPlan(layers=(LayerPlan(0, 2, 4, (1,), (0,)), LayerPlan(1, 2, 4)))
    figure = PlotHook().figure(plan, "t")
    assert REMOVED_LABEL not in legend_labels(figure)
    assert not figure.axes[0].get_lines()


def test_the_title_gives_the_ratio():
    title = title_of("smollm2_0.2", 1000, 800, 1000, 766)
    assert title == "smollm2_0.2: 20.0% of parameters removed (23.4% of decoder layers)"
    assert title_of("x", 0, 0, 0, 0) == "x: pruning profile"


def test_the_png_has_the_size_its_dpi_gives(tmp_path: Path):
    from matplotlib.image import imread

    png = PlotHook(dpi=50).render(HAND_PLAN, "t")
    assert png.startswith(PNG_MAGIC)
    path = write_bytes_atomic(tmp_path / "p.png", png)
    width, height = figure_size(len(HAND_PLAN.layers))
    assert imread(path).shape[:2] == (round(height * 50), round(width * 50))


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "analysis" / "p.png"
    write_bytes_atomic(path, b"old")
    assert path.read_bytes() == b"old" and os.listdir(path.parent) == ["p.png"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()

    def fail(*args: object) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="rename failed"):
        write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"old" and os.listdir(path.parent) == ["p.png"]  # no temporary left


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_plot_is_a_built_in_hook():
    assert default_registry().resolve("plot") is PlotHook


@pytest.fixture(scope="module")
def runs(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A run in memory and a streamed one; the figure each drew is kept to compare with plan.json."""
    drawn: list = []
    original = PlotHook.figure

    def spy(self: PlotHook, plan: PruningPlan, title: str):
        figure = original(self, plan, title)
        drawn.append(figure)
        return figure

    tmp = tmp_path_factory.mktemp("plot-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PlotHook, "figure", spy)
        plain = prune(tmp, tiny_dir, "plain", hooks=[{"name": "plot", "params": {"dpi": 50}}])
        streamed = prune(tmp, tiny_dir, "streamed", hooks=["plot"], model={"streaming": "always"})
    plain.figure, streamed.figure = drawn
    return SimpleNamespace(plain=plain, streamed=streamed)


@pytest.mark.parametrize("which", ["plain", "streamed"])
def test_a_run_writes_the_profile_of_its_plan(runs: SimpleNamespace, which: str):
    from matplotlib.image import imread

    result = getattr(runs, which)
    assert result.code == 0
    assert result.record["placement"]["streamed"] == (which == "streamed")
    png = result.out / "analysis" / "pruning_profile.png"
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert "analysis/pruning_profile.png" in result.record["files"]
    dpi = 50 if which == "plain" else 120
    width, height = figure_size(LAYERS)
    assert imread(png).shape[:2] == (round(height * dpi), round(width * dpi))
    attention, mlp = bars(result.figure)
    assert list(zip(attention, mlp, strict=True)) == profile_of(PruningPlan.from_dict(result.plan))
    record = result.record
    expected = title_of(
        "tiny",
        record["params_before"],
        record["params_after"],
        record["layer_params_before"],
        record["layer_params_after"],
    )
    assert result.figure.get_suptitle() == expected
    assert expected.startswith("tiny: 20.0% of parameters removed (")


def test_the_title_and_the_published_path_are_logged(
    tmp_path: Path, tiny_dir: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="pruning.hooks.plot")
    result = prune(tmp_path, tiny_dir, hooks=[{"name": "plot", "params": {"filename": "profile.PNG"}}])
    assert result.code == 0 and (result.out / "analysis" / "profile.PNG").is_file()
    assert "Pruning profile: tiny: 20.0% of parameters removed (" in caplog.text
    assert f"wrote {result.out / 'analysis' / 'profile.PNG'}" in caplog.text  # published, not staging


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"filename": "plots/profile.png"}, "filename must be a file name ending in .png"),
        ({"filename": "profile.svg"}, "filename must be a file name ending in .png"),
        ({"filename": ".png"}, "filename must be a file name ending in .png"),
        ({"filename": 3}, "filename must be a file name ending in .png"),
        ({"dpi": 0}, "dpi must be an integer in [20, 600]"),
        ({"dpi": 100.5}, "dpi must be an integer in [20, 600]"),
        ({"dpi": True}, "dpi must be an integer in [20, 600]"),
        ({"dpi": 5000}, "dpi must be an integer in [20, 600]"),
        ({"colour": "red"}, "unexpected keyword argument 'colour'"),
    ],
)
def test_bad_params_are_one_line_before_loading(
    tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture, params: dict, message: str
):
    result = prune(tmp_path, tiny_dir, hooks=[{"name": "plot", "params": params}])
    err = capsys.readouterr().err
    assert result.code == 2 and message in err and "hooks[0] plot: bad params" in err
    assert len(err.strip().splitlines()) == 1 and not result.out.exists()


def test_missing_matplotlib_says_how_to_install_it(
    tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what ``import matplotlib`` sees when it is absent
    with pytest.raises(UserError) as info:
        PlotHook()
    assert str(info.value) == "hooks: plot needs matplotlib: pip install 'pruning[plot]'"
    result = prune(tmp_path, tiny_dir, hooks=["analysis", "plot"])
    assert result.code == 2 and not result.out.exists()
    assert capsys.readouterr().err == f"error: {MISSING_MATPLOTLIB}\n"
