"""LoRA: ``dW = (alpha / r) B A`` (Hu et al., 2021), initialised as peft does."""

from __future__ import annotations

import torch

from .base import AdapterMethod, LoraExport, kaiming_uniform_a


class LoRA(AdapterMethod):
    """Low-rank adaptation with factors ``A`` (r x d_in) and ``B`` (d_out x r)."""

    name = "lora"
    factor_kinds = ("A", "B")
    rank_axes = {"A": 0, "B": 1}
    zero_init_kinds = ("B",)

    def factor_shapes(self, d_out, d_in, r):
        return {"A": (r, d_in), "B": (d_out, r)}

    def init_factors(self, d_out, d_in, r, generator, dtype, device):
        return {
            "A": kaiming_uniform_a((r, d_in), generator, dtype, device),
            "B": torch.zeros(d_out, r, dtype=dtype, device=device),
        }

    def scaling(self, layer):
        return layer.lora_alpha / layer.r

    def effective_factors(self, layer, factors):
        return factors["A"], factors["B"], self.scaling(layer)

    def to_lora(self, layer, factors):
        a, b, scale = self.effective_factors(layer, factors)
        return LoraExport(a.detach().clone(), b.detach().clone(), float(scale), float(layer.lora_alpha))
