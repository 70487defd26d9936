"""DoRA: ``W = m * (W0 + s B A) / ||W0 + s B A||_row`` (Liu et al., 2024), as peft computes it.

The row norm is treated as a constant (detached, DoRA section 4.3, as peft does). Unlike peft,
which materialises ``B A`` (d_out x d_in) every step, the norm is computed from
``||W0||^2 + 2 s <W0, B A>_row + s^2 ||B A||^2_row`` using only ``W0 A^T`` (d_out x r) and the
``r x r`` Gram matrix ``A A^T``.
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import LoRA


class DoRA(LoRA):
    """Weight-decomposed LoRA: direction from LoRA factors, magnitude ``m`` trained directly."""

    name = "dora"
    peft_use_dora = True

    def init_layer(self, layer, w0, generator):
        with torch.no_grad():  # m = ||W0||_row (as peft), of the original W0 (PiSSA replaces the base)
            norm = torch.linalg.norm(w0, dim=1).clone()
        super().init_layer(layer, w0, generator)
        layer.magnitude = nn.Parameter(norm)

    def state_tensors(self, layer):
        return {**super().state_tensors(layer), "magnitude": layer.magnitude}

    def to_lora(self, layer, factors):
        out = super().to_lora(layer, factors)
        out.extra["lora_magnitude_vector"] = layer.magnitude.detach().clone()
        return out

    @staticmethod
    def row_norm(layer, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        """``||W0 + scale * B A||`` per output row, without forming ``B A``; shape ``(d_out,)``."""
        with torch.no_grad():
            w0 = layer.base_weight
            a = a.to(w0.dtype)
            b = b.to(w0.dtype)
            w0a = w0 @ a.t()  # (d_out, r)
            gram = a @ a.t()  # (r, r)
            sq = layer.base_row_sqnorm() + 2.0 * scale * (b * w0a).sum(1) + scale * scale * ((b @ gram) * b).sum(1)
            return sq.clamp_min(0.0).sqrt()

    def forward(self, layer, x, factors):
        a, b, scale = self.effective_factors(layer, factors)
        x_a = layer.lora_dropout(x) if layer.has_dropout else None
        z = layer.lowrank_forward(x, a, b, scale, x_adapter=x_a, with_bias=False)  # (..., d_out)
        mag_scale = layer.magnitude / self.row_norm(layer, a, b, scale)  # (d_out,)
        y = z * mag_scale.to(z.dtype)
        bias = layer.base_bias
        return y + bias if bias is not None else y

    def merged_weight(self, layer, factors):
        a, b, scale = self.effective_factors(layer, factors)
        w0 = layer.base_weight
        w = w0 + scale * (b.to(w0.dtype) @ a.to(w0.dtype))
        norm = torch.linalg.norm(w, dim=1)
        layer.merged_row_norm = norm.detach()  # needed to invert the merge exactly
        return w * (layer.magnitude.to(w.dtype) / norm)[:, None]

    def unmerged_weight(self, layer, merged, factors):
        a, b, scale = self.effective_factors(layer, factors)
        # merged = (m / n)[:, None] * (W0 + s B A), with n the row norm recorded at merge time.
        n = layer.merged_row_norm
        lora = scale * (b.to(merged.dtype) @ a.to(merged.dtype))
        return merged * (n / layer.magnitude.to(merged.dtype))[:, None] - lora
