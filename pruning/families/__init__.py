"""Model families by ``model_type``: the built-in adapters, and third-party ones from entry points.

A package adds a family by declaring an entry point in the group ``pruning.families`` whose name is the
``model_type`` it handles and whose value is ``module:AdapterClass``; it is imported only when a model
of that type is pruned or analysed. ``FamilyRegistry.register`` does the same from code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pruning.errors import UserError
from pruning.families.base import ATTENTION, KINDS, MLP, FamilyAdapter, LayerGeometry, OwnedSlice
from pruning.families.gemma2 import Gemma2Family
from pruning.families.gemma3 import Gemma3Family
from pruning.families.layout import LAYOUT_KEY, Layout, stock_model_type
from pruning.families.llama import LlamaFamily
from pruning.families.mistral import MistralFamily
from pruning.families.phi3 import Phi3Family
from pruning.families.qwen2 import Qwen2Family
from pruning.families.qwen3 import Qwen3Family
from pruning.plugins import load_plugin, plugin_names

__all__ = [
    "ATTENTION",
    "KINDS",
    "LAYOUT_KEY",
    "MLP",
    "FAMILIES",
    "GENERIC_FAMILY",
    "FamilyAdapter",
    "FamilyRegistry",
    "LayerGeometry",
    "Layout",
    "OwnedSlice",
    "adapter_for",
    "check_supported",
]

ENTRY_POINT_GROUP = "pruning.families"
BUILTIN: tuple[type[FamilyAdapter], ...] = (
    LlamaFamily,
    MistralFamily,
    Qwen2Family,
    Qwen3Family,
    Phi3Family,
    Gemma2Family,
    Gemma3Family,
)


class FamilyRegistry:
    """``model_type`` -> adapter. Built-ins are registered explicitly; plugins load on first use."""

    def __init__(self, adapters: Iterable[type[FamilyAdapter]] = ()) -> None:
        self._adapters: dict[str, FamilyAdapter] = {}
        for adapter in adapters:
            self.register(adapter)

    def register(self, adapter: type[FamilyAdapter]) -> None:
        if not (isinstance(adapter, type) and issubclass(adapter, FamilyAdapter)) or not adapter.model_types:
            raise TypeError(f"{adapter!r} is not a FamilyAdapter subclass with model_types")
        taken = [t for t in adapter.model_types if t in self._adapters]
        if taken:
            raise ValueError(f"model_type {taken[0]!r} already has an adapter")
        instance = adapter()
        for model_type in adapter.model_types:
            self._adapters[model_type] = instance

    def model_types(self) -> list[str]:
        """Every model_type that has an adapter, plugins included (named, not imported)."""
        plugins = plugin_names(ENTRY_POINT_GROUP)
        return sorted(set(self._adapters) | plugins)

    def get(self, model_type: Any) -> FamilyAdapter | None:
        """The adapter for ``model_type``, loading a plugin that declares it; None when there is none.

        A pruned checkpoint's ``pruned_<type>`` (``pruning.families.layout``) gets the adapter of ``<type>``.
        """
        model_type = stock_model_type(model_type)
        if not isinstance(model_type, str):
            return None
        if model_type not in self._adapters:
            self._load_plugin(model_type)
        return self._adapters.get(model_type)

    def _load_plugin(self, model_type: str) -> None:
        found = load_plugin(ENTRY_POINT_GROUP, model_type, "model family")
        if found is None:
            return
        adapter, where = found
        if not (isinstance(adapter, type) and issubclass(adapter, FamilyAdapter)):
            raise UserError(f"model family plugin {model_type!r} ({where}) is not a FamilyAdapter subclass")
        if model_type not in adapter.model_types:
            raise UserError(f"model family plugin {model_type!r} ({where}) does not list {model_type!r}")
        self.register(adapter)

    def for_gguf_arch(self, arch: Any) -> FamilyAdapter | None:
        """The first registered adapter whose llama.cpp architecture name is ``arch``, else a plugin
        named ``arch`` (a plugin's model_type is usually llama.cpp's name too)."""
        found = next((a for a in self._adapters.values() if a.gguf_arch == arch), None)
        if found is None:
            candidate = self.get(arch)
            if candidate is not None and candidate.gguf_arch in (arch, None):
                found = candidate
        return found


FAMILIES = FamilyRegistry(BUILTIN)
# The transformers naming most families share; analysis reads a family without an adapter through it.
GENERIC_FAMILY: FamilyAdapter = LlamaFamily()


_GEMMA3_MULTIMODAL = (
    " (the multimodal Gemma3ForConditionalGeneration; text-only Gemma 3 checkpoints, model_type "
    "gemma3_text, are supported)"
)


def _model_type(config: Any) -> Any:
    return config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)


def adapter_for(config: Any) -> FamilyAdapter:
    """The adapter for a config (dict or object), or a UserError naming the supported families."""
    model_type = _model_type(config)
    adapter = FAMILIES.get(model_type)
    if adapter is None:
        hint = _GEMMA3_MULTIMODAL if model_type == "gemma3" else ""
        supported = ", ".join(FAMILIES.model_types())
        raise UserError(f"unsupported architecture {model_type!r}{hint}: pruning supports {supported}")
    return adapter


def check_supported(config: Any) -> str:
    """The config's stock model_type (``llama`` for ``pruned_llama``), or a UserError naming the
    supported ones."""
    adapter_for(config)
    return str(stock_model_type(_model_type(config)))
