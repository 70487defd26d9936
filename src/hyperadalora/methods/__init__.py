"""Adapter methods (DESIGN.md section 1): one small module each, registered by name.

This package imports nothing else of hyperadalora at import time (``functional`` aside), so
:mod:`hyperadalora.config` can derive its list of methods from :data:`METHOD_REGISTRY`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .adalora import AdaLoRA, orthogonality_penalty
from .base import AdapterMethod, LoraExport
from .dora import DoRA
from .dylora import DyLoRA
from .lora import LoRA

if TYPE_CHECKING:
    from ..config import AdapterConfig

METHOD_REGISTRY: dict[str, type[AdapterMethod]] = {m.name: m for m in (LoRA, AdaLoRA, DoRA, DyLoRA)}


def method_class(name: str) -> type[AdapterMethod]:
    """The registered method class called ``name`` (``lora``, ``adalora``, ``dora``, ``dylora``)."""
    try:
        return METHOD_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown adapter method {name!r}; allowed values: {', '.join(METHOD_REGISTRY)}") from None


def build_method(config: AdapterConfig) -> AdapterMethod:
    """A fresh method object for one wrapped model (it holds that model's method state)."""
    return method_class(config.method)(config)


__all__ = ["AdaLoRA", "AdapterMethod", "DoRA", "DyLoRA", "LoRA", "LoraExport", "METHOD_REGISTRY", "build_method",
           "method_class", "orthogonality_penalty"]
