"""Cutting factor matrices into hypernetwork tokens and back (DESIGN.md section 2).

Every factor is viewed as ``(rank, width)``: the method declares which axis of each factor kind
indexes rank components (``AdapterMethod.rank_axes``); a factor whose rank axis is its last is
transposed (AdaLoRA's P, LoRA's B), a 1-D factor (lam) is ``(r, 1)``. A layout cuts that view into
``rank_span x width_span`` blocks, each block one token of ``rank_span * width_span`` features; a
ragged last block is zero-padded on the way in and stripped on the way out. Presets: ``rank`` =
(1, whole width), ``rows`` = (whole rank, 1), ``elements`` = (1, 1), ``patch`` = (1, 64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PATCH_WIDTH = 64


def rank_width_shape(shape: tuple[int, ...], rank_axis: int) -> tuple[int, int]:
    """``(rank, width)`` of a factor of ``shape`` whose rank components lie along ``rank_axis``."""
    if len(shape) == 1:
        return shape[0], 1
    return (shape[1], shape[0]) if rank_axis == 1 else (shape[0], shape[1])


def to_rank_width(factors: torch.Tensor, rank_axis: int) -> torch.Tensor:
    """Stacked factors ``(n, *shape)`` -> ``(n, rank, width)``."""
    if factors.dim() == 2:
        return factors.unsqueeze(-1)  # (n, r, 1)
    if rank_axis == 1:
        return factors.transpose(1, 2)  # (n, r, d_out)
    return factors  # (n, r, d_in)


def from_rank_width(view: torch.Tensor, rank_axis: int, factor_dim: int) -> torch.Tensor:
    """Inverse of :func:`to_rank_width` for factors of ``factor_dim`` dimensions (1 or 2)."""
    if factor_dim == 1:
        return view.squeeze(-1)
    if rank_axis == 1:
        return view.transpose(1, 2)
    return view


@dataclass(frozen=True)
class TokenLayout:
    """A block size: ``rank_span`` rank components by ``width_span`` columns per token.

    ``None`` for a span means "the whole axis".
    """

    rank_span: int | None
    width_span: int | None

    @classmethod
    def preset(cls, name: str, patch_width: int = PATCH_WIDTH) -> TokenLayout:
        """The named layouts of DESIGN.md section 2."""
        presets = {"rank": cls(1, None), "rows": cls(None, 1), "elements": cls(1, 1), "patch": cls(1, patch_width)}
        if name not in presets:
            raise ValueError(f"unknown token layout {name!r}; allowed values: {', '.join(presets)}")
        return presets[name]

    @classmethod
    def from_config(cls, hyper) -> TokenLayout:
        """The layout a :class:`~hyperadalora.config.HyperConfig` asks for (preset plus overrides)."""
        base = cls.preset(hyper.tokens, hyper.patch_width)
        return cls(hyper.rank_span if hyper.rank_span is not None else base.rank_span,
                   hyper.width_span if hyper.width_span is not None else base.width_span)

    def grid(self, rank: int, width: int) -> tuple[int, int]:
        """Number of blocks along the rank and the width axis."""
        rs, ws = self.spans(rank, width)
        return -(-rank // rs), -(-width // ws)

    def spans(self, rank: int, width: int) -> tuple[int, int]:
        """Concrete ``(rank_span, width_span)`` for a ``rank x width`` view."""
        return (self.rank_span or rank, self.width_span or width)

    def num_tokens(self, rank: int, width: int) -> int:
        """Tokens per factor matrix."""
        rs, ws = self.spans(rank, width)
        return -(-rank // rs) * -(-width // ws)

    def token_dim(self, rank: int, width: int) -> int:
        """Features per token."""
        rs, ws = self.spans(rank, width)
        return rs * ws

    def cut(self, view: torch.Tensor) -> torch.Tensor:
        """``(n, rank, width)`` -> ``(n, tokens, rank_span * width_span)`` (row-major blocks)."""
        n, rank, width = view.shape
        rs, ws = self.spans(rank, width)
        pr, pw = -(-rank // rs) * rs - rank, -(-width // ws) * ws - width
        if pr or pw:
            view = F.pad(view, (0, pw, 0, pr))
        gr, gw = view.shape[1] // rs, view.shape[2] // ws
        blocks = view.reshape(n, gr, rs, gw, ws).permute(0, 1, 3, 2, 4)  # (n, gr, gw, rs, ws)
        return blocks.reshape(n, gr * gw, rs * ws)

    def uncut(self, tokens: torch.Tensor, rank: int, width: int) -> torch.Tensor:
        """Inverse of :meth:`cut`: ``(n, tokens, features)`` -> ``(n, rank, width)``."""
        n = tokens.shape[0]
        rs, ws = self.spans(rank, width)
        gr, gw = -(-rank // rs), -(-width // ws)
        blocks = tokens.reshape(n, gr, gw, rs, ws).permute(0, 1, 3, 2, 4)  # (n, gr, rs, gw, ws)
        return blocks.reshape(n, gr * rs, gw * ws)[:, :rank, :width]
