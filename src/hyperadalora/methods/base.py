"""The contract every adapter method implements (DESIGN.md section 1).

A method is stateless: it declares its factor kinds and shapes, initialises direct factors,
and computes the adapted layer's output and its weight update from factors handed to it.
Where the factors come from (trained parameters or a hypernetwork) is the factor source's
business, not the method's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from ..layers import AdaptedLinear


class AdapterMethod:
    """Base class of the four adapter methods.

    Attributes:
        name: Method name as used in :class:`~hyperadalora.config.AdapterConfig`.
        factor_kinds: Names of the low-rank factors (the tensors a hypernetwork would generate).
    """

    name: ClassVar[str] = ""
    factor_kinds: ClassVar[tuple[str, ...]] = ()

    def factor_shapes(self, d_out: int, d_in: int, r: int) -> dict[str, tuple[int, ...]]:
        """Shape of each factor kind for a ``d_out x d_in`` layer of rank ``r``."""
        raise NotImplementedError

    def init_factors(self, d_out: int, d_in: int, r: int, generator: torch.Generator | None,
                     dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """Initial values of the factors (as peft initialises them)."""
        raise NotImplementedError

    def scaling(self, layer: AdaptedLinear) -> float:
        """The scalar multiplying the low-rank update in the current mode."""
        raise NotImplementedError

    def effective_factors(self, layer: AdaptedLinear, factors: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Reduces the factors to ``(A, B, scale)`` with ``dW = scale * B @ A``."""
        raise NotImplementedError

    def forward(self, layer: AdaptedLinear, x: torch.Tensor, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Output of the adapted layer: ``W0 x + bias + scale * B A x``."""
        from ..functional import lowrank_linear

        a, b, scale = self.effective_factors(layer, factors)
        x_a = layer.lora_dropout(x) if layer.has_dropout else None
        return lowrank_linear(x, layer.base_weight, layer.base_bias, a, b, scale, x_adapter=x_a)

    def merged_weight(self, layer: AdaptedLinear, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The base weight with the update folded in, shape ``(d_out, d_in)``."""
        a, b, scale = self.effective_factors(layer, factors)
        w0 = layer.base_weight
        return w0 + scale * (b.to(w0.dtype) @ a.to(w0.dtype))

    def unmerged_weight(self, layer: AdaptedLinear, merged: torch.Tensor,
                        factors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverts :meth:`merged_weight` given the merged weight."""
        a, b, scale = self.effective_factors(layer, factors)
        return merged - scale * (b.to(merged.dtype) @ a.to(merged.dtype))


def kaiming_uniform_a(shape: tuple[int, int], generator: torch.Generator | None, dtype, device) -> torch.Tensor:
    """peft's LoRA ``A`` init: ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    fan_in = shape[1]
    bound = 1.0 / fan_in**0.5
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.uniform_(-bound, bound, generator=generator)
