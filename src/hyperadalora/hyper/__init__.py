"""Hypernetwork factor source: token layouts, bodies and the batched generator."""

from .bodies import AttentionBody, CNNBody, MLPBody, build_body
from .source import HyperFactorSource, KindHypernetwork
from .tokens import TokenLayout

__all__ = ["AttentionBody", "CNNBody", "HyperFactorSource", "KindHypernetwork", "MLPBody", "TokenLayout",
           "build_body"]
