"""The built-in ``plot`` hook: one picture of where pruning cut, layer by layer.

A global plan spreads the removals unevenly over the depth of the model, and the JSON reports say so only
in numbers; this hook draws the share of attention and MLP each decoder layer keeps. The counts come
from the plan, never from the weights, so it draws a streamed run (layers on the meta device) as well.
matplotlib is an optional extra (``pip install 'pruning[plot]'``), imported only when a config names
the hook.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

from pruning.errors import UserError
from pruning.hooks.base import Hook
from pruning.hooks.context import PipelineContext
from pruning.planning.plan import PruningPlan
from pruning.storage.fs import write_bytes_atomic

logger = logging.getLogger(__name__)

MISSING_MATPLOTLIB = "hooks: plot needs matplotlib: pip install 'pruning[plot]'"
MIN_DPI, MAX_DPI = 20, 600  # below: unreadable labels; above: a wide model's figure is hundreds of MB
FIGURE_HEIGHT_IN = 4.5
REMOVED_LABEL = "block removed"
_BAR_WIDTH = 0.4


def profile_of(plan: PruningPlan) -> list[tuple[float, float]]:
    """Per layer, in plan order: (share of KV groups kept, share of MLP channels kept), each in [0, 1].

    A layer whose dense block has nothing to count (0 KV groups or 0 channels) gets NaN for that block:
    there was nothing to keep or remove, and a bar at 1 or 0 would claim otherwise.
    """
    return [
        (
            _kept(layer.num_kv_groups, len(layer.remove_kv_groups)),
            _kept(layer.num_channels, len(layer.remove_channels)),
        )
        for layer in plan.layers
    ]


def _kept(dense: int, removed: int) -> float:
    return (dense - removed) / dense if dense > 0 else math.nan


def title_of(
    name: str, params_before: int, params_after: int, layer_params_before: int, layer_params_after: int
) -> str:
    """``<name>: 20.0% of parameters removed (23.4% of decoder layers)``: the ratio the run reached."""
    if params_before <= 0:
        return f"{name}: pruning profile"  # no counts (never in a real run): no ratio to claim
    total = 1 - params_after / params_before
    title = f"{name}: {total:.1%} of parameters removed"
    if layer_params_before > 0:
        title += f" ({1 - layer_params_after / layer_params_before:.1%} of decoder layers)"
    return title


def figure_size(num_layers: int) -> tuple[float, float]:
    """Inches: room for two readable bars per layer (80 layers are no smear) and the legend beside them."""
    return (min(max(7.0, 0.3 * num_layers + 4.0), 32.0), FIGURE_HEIGHT_IN)


class PlotHook(Hook):
    """Draws each decoder layer's kept share of attention and MLP at ``after_prune``, as a PNG.

    Params: ``filename`` (a file name ending in ``.png``; default ``pruning_profile.png``), ``dpi``
    (an integer in [20, 600]; default 120). Writes ``<output dir>/analysis/<filename>``.
    """

    subdir = "analysis"

    def __init__(self, filename: str = "pruning_profile.png", dpi: int = 120) -> None:
        if (
            not isinstance(filename, str)
            or Path(filename).name != filename
            or not filename.lower().endswith(".png")
            or len(filename) <= len(".png")
        ):
            raise ValueError(
                f"filename must be a file name ending in .png, without directories, got {filename!r}"
            )
        if not isinstance(dpi, int) or isinstance(dpi, bool) or not MIN_DPI <= dpi <= MAX_DPI:
            raise ValueError(f"dpi must be an integer in [{MIN_DPI}, {MAX_DPI}], got {dpi!r}")
        try:  # ``import matplotlib`` first: a cached submodule would hide that the package is gone
            import matplotlib  # noqa: F401
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as e:
            raise UserError(MISSING_MATPLOTLIB) from e
        # The Agg canvas is bound to this figure only: ``matplotlib.use`` would switch the backend of a
        # process (a notebook) that runs the pipeline, and pyplot's global figure list is not needed.
        self._figure_cls, self._canvas_cls = Figure, FigureCanvasAgg
        self.filename, self.dpi = filename, dpi

    def after_prune(self, context: PipelineContext, **kwargs: Any) -> None:
        """Draw the plan's kept shares and write the PNG atomically; log the title and where it appears."""
        if context.plan is None:
            raise RuntimeError("after_prune fired without a plan")
        title = title_of(
            context.config.name,
            context.params_before,
            context.params_after,
            context.layer_params_before,
            context.layer_params_after,
        )
        png = self.render(context.plan, title)
        write_bytes_atomic(context.output_dir / self.subdir / self.filename, png)
        published = context.published_dir or context.output_dir
        logger.info("Pruning profile: %s", title)
        logger.info("  wrote %s", published / self.subdir / self.filename)

    def figure(self, plan: PruningPlan, title: str) -> Any:
        """The matplotlib Figure: grouped bars per layer, an 'x' where a whole block is gone."""
        from matplotlib.ticker import MaxNLocator, PercentFormatter

        profile = profile_of(plan)
        fig = self._figure_cls(figsize=figure_size(len(profile)), dpi=self.dpi, layout="constrained")
        self._canvas_cls(fig)
        ax = fig.add_subplot()
        layers = [layer.layer_idx for layer in plan.layers]
        half = _BAR_WIDTH / 2
        ax.bar(
            [x - half for x in layers],
            [a for a, _ in profile],
            _BAR_WIDTH,
            label="attention (KV groups kept)",
        )
        ax.bar([x + half for x in layers], [m for _, m in profile], _BAR_WIDTH, label="MLP (channels kept)")
        removed_x = [lp.layer_idx - half for lp in plan.layers if lp.attention_removed]
        removed_x += [lp.layer_idx + half for lp in plan.layers if lp.mlp_removed]
        if removed_x:  # a zero-height bar is invisible: mark it, and say what the mark means
            ax.plot(
                sorted(removed_x),
                [0.0] * len(removed_x),
                linestyle="none",
                marker="x",
                markersize=9,
                markeredgewidth=2.5,
                color="crimson",
                label=REMOVED_LABEL,
                clip_on=False,
                zorder=3,
            )
        ax.set_ylim(0, 1.05)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if layers:
            ax.set_xlim(min(layers) - 0.7, max(layers) + 0.7)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("kept (share of the dense block)")
        fig.suptitle(title)  # centred on the figure, not the axes: the legend beside them must not cut it
        ax.grid(axis="y", alpha=0.3)
        # beside the axes, never over a bar; the bars first, the removal mark last
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: labels[i] == REMOVED_LABEL)
        ax.legend(
            [handles[i] for i in order],
            [labels[i] for i in order],
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize="small",
            frameon=False,
        )
        return fig

    def render(self, plan: PruningPlan, title: str) -> bytes:
        """The PNG's bytes, at ``figure_size(len(plan.layers))`` inches times ``dpi`` pixels."""
        buffer = io.BytesIO()
        self.figure(plan, title).savefig(buffer, format="png", dpi=self.dpi)
        return buffer.getvalue()
