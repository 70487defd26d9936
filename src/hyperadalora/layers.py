"""The adapted linear layer that replaces a target ``nn.Linear`` (or GPT-2 ``Conv1D``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .functional import lowrank_add, lowrank_linear
from .quant import QuantizedMergeError, dequantized_weight, is_quantized

if TYPE_CHECKING:
    from .methods import AdapterMethod

FactorProvider = Callable[[], dict[str, torch.Tensor]]


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``(d_out, d_in)`` weight of an ``nn.Linear`` or a transposed view of a ``Conv1D``'s
    (of a bitsandbytes quantised layer: its dequantised weight, a new tensor)."""
    if is_quantized(module):
        return dequantized_weight(module)
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 style layer stores (d_in, d_out)
        return module.weight.t()
    raise TypeError(f"unsupported layer type {type(module).__name__}; expected nn.Linear or Conv1D")


class AdaptedLinear(nn.Module):
    """A frozen linear layer plus a low-rank adapter whose factors come from a factor source.

    The method creates the factors (``nn.Parameter`` entries of ``self.factors``) and any state
    of its own (:meth:`AdapterMethod.init_layer`). A non-direct factor source takes them over
    and installs a provider (``set_factor_provider``) that returns generated tensors of the same
    shapes instead.

    Args:
        base_layer: The frozen layer being adapted.
        method: The adapter method (LoRA, AdaLoRA, DoRA, DyLoRA).
        r: Adapter rank.
        lora_alpha: Scaling numerator.
        lora_dropout: Dropout probability on the adapter input.
        generator: RNG for the factor initialisation (``None``: torch's global RNG).
    """

    def __init__(self, base_layer: nn.Module, method: AdapterMethod, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.method = method
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.has_dropout = lora_dropout > 0
        self.lora_dropout = nn.Dropout(lora_dropout) if self.has_dropout else nn.Identity()
        w = self.base_weight
        self.out_features, self.in_features = w.shape
        self._row_sqnorm: torch.Tensor | None = None
        self.merged_row_norm: torch.Tensor | None = None
        self.quantized = is_quantized(base_layer)
        method.init_layer(self, w, generator)  # factors and method state (magnitude, keep-mask, ...)
        self._upcast_half_parameters()
        # Whether pruned rank components are masked in the forward (set by the source / allocator).
        self.mask_in_forward = False
        self.merged = False
        self.disabled = False
        self._factor_provider: FactorProvider | None = None

    # -- base layer access -------------------------------------------------------------------
    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen weight as ``(d_out, d_in)``."""
        return linear_weight(self.base_layer)

    def base_layer_replaced(self) -> None:
        """Re-reads what depends on the base layer's kind after it was swapped in place (e.g. a
        bitsandbytes layer dequantised by :func:`~hyperadalora.quant.dequantize_model_`)."""
        self.quantized = is_quantized(self.base_layer)
        self._row_sqnorm = None

    @property
    def base_bias(self) -> torch.Tensor | None:
        """The frozen bias, or ``None``."""
        return getattr(self.base_layer, "bias", None)

    def base_row_sqnorm(self) -> torch.Tensor:
        """Cached ``||W0||^2`` per output row (DoRA's norm needs it every step)."""
        if self._row_sqnorm is None or self._row_sqnorm.device != self.base_weight.device:
            with torch.no_grad():
                w = self.base_weight
                self._row_sqnorm = (w * w).sum(1)
        return self._row_sqnorm

    def _upcast_half_parameters(self) -> None:
        # Master weights stay in float32 over a bf16 / fp16 (or quantised) base, as peft's
        # autocast_adapter_dtype does; the forward casts them to the activations' dtype.
        for name, p in self.named_parameters():
            if not name.startswith("base_layer.") and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()

    # -- factors -----------------------------------------------------------------------------
    def set_factor_provider(self, provider: FactorProvider | None) -> None:
        """Installs (or removes, with ``None``) a non-direct source of factors."""
        self._factor_provider = provider

    def get_factors(self) -> dict[str, torch.Tensor]:
        """The factors the forward pass uses now, keyed by factor kind."""
        if self._factor_provider is not None:
            return self._factor_provider()
        return dict(self.factors.items())

    # -- forward / merge ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled or self.r == 0:  # r == 0: every component was compacted away
            return self.base_layer(x)
        return self.method.forward(self, x, self.get_factors())

    def lowrank_forward(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                        x_adapter: torch.Tensor | None = None, with_bias: bool = True) -> torch.Tensor:
        """``x W0^T [+ bias] + scale * (x_adapter A^T) B^T``, the base term by the fused kernel or,
        over a quantised base, by the quantised layer itself.

        Args:
            x: Input ``(..., d_in)``.
            a: Down projection ``(r, d_in)``.
            b: Up projection ``(d_out, r)``.
            scale: Scalar multiplier of the low-rank term.
            x_adapter: Input of the low-rank path when it differs from ``x`` (after dropout).
            with_bias: Whether the base bias is included.
        """
        if not self.quantized:
            return lowrank_linear(x, self.base_weight, self.base_bias if with_bias else None, a, b, scale,
                                  x_adapter=x_adapter)
        y = self.base_layer(x)  # (..., d_out), bias included
        bias = self.base_bias
        if not with_bias and bias is not None:
            y = y - bias.to(y.dtype)
        return lowrank_add(y, x if x_adapter is None else x_adapter, a, b, scale)

    def delta_weight(self) -> torch.Tensor:
        """The update ``W_adapted - W0`` in the current mode, ``(d_out, d_in)``."""
        with torch.no_grad():
            return self.method.merged_weight(self, self.get_factors()) - self.base_weight

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the adapter into the base weight (no-op if already merged)."""
        if self.merged:
            return
        self._refuse_if_quantized("merge the adapter into")
        new_w = self.method.merged_weight(self, self.get_factors())
        self.set_base_weight(new_w)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restores the base weight (no-op if not merged)."""
        if not self.merged:
            return
        old_w = self.method.unmerged_weight(self, self.base_weight, self.get_factors())
        self.set_base_weight(old_w)
        self.merged = False

    def set_base_weight(self, w: torch.Tensor) -> None:
        """Overwrites the frozen weight with ``w`` given as ``(d_out, d_in)``.

        Raises:
            QuantizedMergeError: The base layer is quantised.
        """
        self._refuse_if_quantized("overwrite")
        target = self.base_layer.weight
        target.data.copy_(w.t() if type(self.base_layer).__name__ == "Conv1D" else w)
        self._row_sqnorm = None

    def _refuse_if_quantized(self, what: str) -> None:
        if self.quantized:
            raise QuantizedMergeError(
                f"cannot {what} the quantised base weight of {type(self.base_layer).__name__}: re-quantising "
                "would round the update away. Export the adapter (ha.export_peft_lora / save_adapter) and use it on the "
                "quantised base, or load the base in bf16 / fp32 and merge there. PiSSA, which replaces W0 by "
                "a residual, needs an unquantised base for the same reason.")

    def extra_repr(self) -> str:
        return (f"method={self.method.name}, r={self.r}, in_features={self.in_features}, "
                f"out_features={self.out_features}, alpha={self.lora_alpha}")
