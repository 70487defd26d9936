"""Adapter methods (DESIGN.md section 1): one small module each."""

from .adalora import AdaLoRA, orthogonality_penalty
from .base import AdapterMethod
from .dora import DoRA
from .dylora import DyLoRA
from .lora import LoRA

METHOD_REGISTRY: dict[str, type[AdapterMethod]] = {m.name: m for m in (LoRA, AdaLoRA, DoRA, DyLoRA)}


def get_method(name: str) -> AdapterMethod:
    """Returns the method object for ``name`` (``lora``, ``adalora``, ``dora`` or ``dylora``)."""
    try:
        return METHOD_REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown adapter method {name!r}; allowed values: {', '.join(METHOD_REGISTRY)}") from None


__all__ = ["AdaLoRA", "AdapterMethod", "DoRA", "DyLoRA", "LoRA", "METHOD_REGISTRY", "get_method",
           "orthogonality_penalty"]
