"""LoRA: ``dW = (alpha / r) B A`` (Hu et al., 2021), initialised as peft does.

``AdapterConfig.init="pissa"`` (PiSSA, Meng et al., 2024; LoRA and DoRA) initialises ``A`` and
``B`` from the top-r singular triplets of ``W0`` exactly as peft's ``init_lora_weights="pissa"``
(``W0 = U S V^T``; ``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)``, ``s = alpha / r``) and
replaces the base weight by the residual ``W0 - s B A``, so the wrapped model starts as the base
model. Consequences, all handled here:

* merge / unmerge fold the update into the residual base: the merged weight is the trained one;
* the initial factors are kept (``pissa_a0`` / ``pissa_b0`` buffers, saved with the adapter);
  loading an adapter onto a fresh base model recomputes the residual and, should the SVD differ
  from the one of the saved run (another machine or library version), corrects the base to the
  saved run's residual;
* export follows peft's conversion of a PiSSA adapter to a LoRA relative to the *original*
  ``W0`` (``save_pretrained(path_initial_model_for_weight_conversion=...)``): rank ``2r``,
  ``A' = [A; A0]``, ``B' = [B, -B0]``, ``lora_alpha = 2 alpha`` (same scale), so
  ``W0 + s B' A' = (W0 - s B0 A0) + s B A``;
* ``model.unwrap(merge=False)`` returns the residual base, as peft's ``unload()`` does.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterMethod, LoraExport, kaiming_uniform_a


class LoRA(AdapterMethod):
    """Low-rank adaptation with factors ``A`` (r x d_in) and ``B`` (d_out x r)."""

    name = "lora"
    factor_kinds = ("A", "B")
    rank_axes = {"A": 0, "B": 1}
    zero_init_kinds = ("B",)
    inits = ("default", "pissa")

    def factor_shapes(self, d_out, d_in, r):
        return {"A": (r, d_in), "B": (d_out, r)}

    def init_factors(self, d_out, d_in, r, generator, dtype, device):
        return {
            "A": kaiming_uniform_a((r, d_in), generator, dtype, device),
            "B": torch.zeros(d_out, r, dtype=dtype, device=device),
        }

    @property
    def pissa(self) -> bool:
        """Whether this model uses the PiSSA initialisation (residual base)."""
        return self.config is not None and self.config.init == "pissa"

    def init_layer(self, layer, w0, generator):
        if not self.pissa:
            super().init_layer(layer, w0, generator)
            return
        a, b = pissa_factors(w0, layer.r, layer.lora_alpha / layer.r)
        layer.factors = nn.ParameterDict({"A": nn.Parameter(a.to(w0.dtype)), "B": nn.Parameter(b.to(w0.dtype))})
        layer.register_buffer("pissa_a0", layer.factors["A"].detach().clone())
        layer.register_buffer("pissa_b0", layer.factors["B"].detach().clone())
        layer.set_base_weight(self._residual(w0.to(torch.float32), layer).to(w0.dtype))

    def _residual(self, w: torch.Tensor, layer) -> torch.Tensor:
        """``w - s B0 A0`` in float32, as peft computes it."""
        return w - (layer.lora_alpha / layer.r) * layer.pissa_b0.float() @ layer.pissa_a0.float()

    def state_tensors(self, layer):
        return {"pissa_a0": layer.pissa_a0, "pissa_b0": layer.pissa_b0} if self.pissa else {}

    @torch.no_grad()
    def before_load(self, layer, saved):
        if not self.pissa or (torch.equal(saved["pissa_a0"], layer.pissa_a0.cpu())
                              and torch.equal(saved["pissa_b0"], layer.pissa_b0.cpu())):
            return
        # The fresh SVD differs from the saved run's: rebuild W0 and subtract the saved init instead.
        w0 = layer.base_weight.float() + (layer.lora_alpha / layer.r) * layer.pissa_b0.float() @ layer.pissa_a0.float()
        layer.pissa_a0.copy_(saved["pissa_a0"])
        layer.pissa_b0.copy_(saved["pissa_b0"])
        layer.set_base_weight(self._residual(w0, layer).to(layer.base_weight.dtype))

    def scaling(self, layer):
        return layer.lora_alpha / layer.r

    def effective_factors(self, layer, factors):
        return factors["A"], factors["B"], self.scaling(layer)

    def to_lora(self, layer, factors):
        a, b, scale = self.effective_factors(layer, factors)
        a, b = a.detach().clone(), b.detach().clone()
        if not self.pissa:
            return LoraExport(a, b, float(scale), float(layer.lora_alpha))
        # Relative to the original W0 (peft's PiSSA -> LoRA conversion): rank 2r, same scale.
        a = torch.cat([a, layer.pissa_a0.to(a.dtype)], dim=0)
        b = torch.cat([b, -layer.pissa_b0.to(b.dtype)], dim=1)
        return LoraExport(a, b, float(scale), 2.0 * float(layer.lora_alpha))


@torch.no_grad()
def pissa_factors(w0: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's ``pissa_init``: ``(A, B)`` in float32 from the top-``r`` singular triplets of ``w0``.

    Args:
        w0: The base weight ``(d_out, d_in)``.
        r: The rank.
        scale: The LoRA scale ``alpha / r`` (divided out so that ``scale * B A = U_r S_r V_r^T``).
    """
    u, s, vh = torch.linalg.svd(w0.to(torch.float32), full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    sr = s[:r] / scale
    a = torch.diag(torch.sqrt(sr)) @ vh[:r]  # (r, d_in)
    b = u[:, :r] @ torch.diag(torch.sqrt(sr))  # (d_out, r)
    return a, b
