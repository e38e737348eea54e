"""The pruning plan: which KV groups and MLP channels each layer loses.

It is the hand-off between steps: scoring and planning produce it, surgery applies it, the oracle
zeroes it, the checkpoint and reports describe it. Indices always refer to the dense (original) layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer loses. A KV group is one KV head with all query heads that share it."""

    layer_idx: int
    num_kv_groups: int
    num_channels: int
    remove_kv_groups: tuple[int, ...] = ()
    remove_channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name, removed, size in (
            ("remove_kv_groups", self.remove_kv_groups, self.num_kv_groups),
            ("remove_channels", self.remove_channels, self.num_channels),
        ):
            if len(set(removed)) != len(removed) or any(not 0 <= i < size for i in removed):
                raise ValueError(f"layer {self.layer_idx}: {name} must be distinct indices in [0, {size})")
        object.__setattr__(self, "remove_kv_groups", tuple(sorted(self.remove_kv_groups)))
        object.__setattr__(self, "remove_channels", tuple(sorted(self.remove_channels)))

    @property
    def keep_kv_groups(self) -> tuple[int, ...]:
        removed = set(self.remove_kv_groups)
        return tuple(i for i in range(self.num_kv_groups) if i not in removed)

    @property
    def keep_channels(self) -> tuple[int, ...]:
        removed = set(self.remove_channels)
        return tuple(i for i in range(self.num_channels) if i not in removed)

    @property
    def attention_removed(self) -> bool:
        """True when no KV group is left: the block becomes ZeroAttention."""
        return self.num_kv_groups > 0 and len(self.remove_kv_groups) == self.num_kv_groups

    @property
    def mlp_removed(self) -> bool:
        """True when no channel is left: the block becomes ZeroMLP."""
        return self.num_channels > 0 and len(self.remove_channels) == self.num_channels

    @property
    def is_empty(self) -> bool:
        return not self.remove_kv_groups and not self.remove_channels


@dataclass(frozen=True)
class PruningPlan:
    """A whole model's plan plus the bookkeeping the reports need."""

    layers: tuple[LayerPlan, ...]
    criterion: str = "manual"
    params_before: int = 0
    params_target: int = 0
    params_planned: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def layer(self, idx: int) -> LayerPlan:
        return self.layers[idx]

    def to_dict(self) -> dict[str, Any]:
        """plan.json: valid against ``pruning/schemas/pruning_plan.schema.json``."""
        return {
            "report_type": "pruning_plan",
            "schema_version": 1,
            "criterion": self.criterion,
            "params_before": self.params_before,
            "params_target": self.params_target,
            "params_planned": self.params_planned,
            "extra": dict(self.extra),
            "layers": [
                {
                    "layer_idx": lp.layer_idx,
                    "num_kv_groups": lp.num_kv_groups,
                    "num_channels": lp.num_channels,
                    "remove_kv_groups": list(lp.remove_kv_groups),
                    "remove_channels": list(lp.remove_channels),
                }
                for lp in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningPlan:
        layers = tuple(
            LayerPlan(
                layer_idx=d["layer_idx"],
                num_kv_groups=d["num_kv_groups"],
                num_channels=d["num_channels"],
                remove_kv_groups=tuple(d["remove_kv_groups"]),
                remove_channels=tuple(d["remove_channels"]),
            )
            for d in data["layers"]
        )
        return cls(
            layers=layers,
            criterion=data.get("criterion", "manual"),
            params_before=data.get("params_before", 0),
            params_target=data.get("params_target", 0),
            params_planned=data.get("params_planned", 0),
            extra=dict(data.get("extra", {})),
        )
