"""Hypernetwork bodies, token layouts and the per-kind hypernetwork (used by ``sources.HyperSource``)."""

from .bodies import AttentionBody, CNNBody, MLPBody, build_body
from .network import KindHypernetwork
from .tokens import TokenLayout

__all__ = ["AttentionBody", "CNNBody", "KindHypernetwork", "MLPBody", "TokenLayout", "build_body"]
