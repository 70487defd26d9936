"""Helpers shared by the integrations."""

from __future__ import annotations

from torch import nn

from ..adapted_model import AdaptedModel


def unwrap_adapted(model: nn.Module | None) -> AdaptedModel | None:
    """The :class:`~hyperadalora.AdaptedModel` inside ``model`` (DDP's ``.module``, accelerate /
    DeepSpeed wrappers' ``.module``, ``torch.compile``'s ``._orig_mod``), or ``None``."""
    m = model
    for _ in range(16):
        if m is None or isinstance(m, AdaptedModel):
            return m
        children = m.__dict__.get("_modules", {})
        inner = None
        for attr in ("module", "_orig_mod"):
            inner = children.get(attr, m.__dict__.get(attr))
            if inner is not None:
                break
        m = inner
    return None


def require_adapted(model: nn.Module | None, where: str) -> AdaptedModel:
    """Like :func:`unwrap_adapted`, but raises a clear error when there is none."""
    adapted = unwrap_adapted(model)
    if adapted is None:
        raise TypeError(f"{where} needs a model made by hyperadalora.wrap(...) (an AdaptedModel, possibly inside "
                        f"DDP / accelerate / torch.compile), got {type(model).__name__}")
    return adapted
