"""The contract every adapter method implements (DESIGN.md sections 1 and 3).

A method owns everything that is specific to it: its factor kinds and shapes and how each kind
is viewed as ``(rank x width)``, the initialisation of a layer (factors and any extra state such
as DoRA's magnitude or AdaLoRA's keep-mask; it sees ``W0``), the forward and merge math, what
it does after an optimizer step (DyLoRA's rank sampling), its regulariser (AdaLoRA's
orthogonality term), the state it saves, and its conversion to plain LoRA for export. Where the
factors come from (trained parameters or a hypernetwork) is the factor source's business
(:mod:`hyperadalora.sources`); the layer and the model ask the method, never test its name.

One method object serves every layer of one wrapped model, so per-model state (DyLoRA's
generator) lives on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn


if TYPE_CHECKING:
    from ..config import AdapterConfig
    from ..layers import AdaptedLinear


@dataclass
class LoraExport:
    """One layer as a plain LoRA: ``dW = scale * b @ a`` with peft's ``scale = alpha / rank``.

    Attributes:
        a: ``lora_A`` (rank x d_in).
        b: ``lora_B`` (d_out x rank).
        scale: The scale the update is multiplied by.
        alpha: peft's ``lora_alpha`` for this module (``scale * rank`` up to rounding).
        extra: Further peft tensors by key suffix (e.g. DoRA's ``lora_magnitude_vector``).
        dropped: Values of components left out of the export that are not zero (AdaLoRA's
            pruned-but-nonzero singular values), for a warning; ``None`` when nothing was left out.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    alpha: float
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        """Number of exported rank components."""
        return int(self.a.shape[0])


class AdapterMethod:
    """Base class of the adapter methods.

    Attributes:
        name: Method name as used in :class:`~hyperadalora.config.AdapterConfig`.
        factor_kinds: Names of the low-rank factors (the tensors a hypernetwork would generate).
        rank_axes: For each kind, the axis of the factor that indexes rank components (a
            hypernetwork views every factor as ``(rank, width)``; 1-D factors are ``(r, 1)``).
        zero_init_kinds: Kinds initialised at zero (every module starts identical there: the
            hypernetworks' symmetry trap, DESIGN.md section 2).
        singular_value_kind: The kind a rank allocator scores and masks (``None``: none).
        uses_allocator: Whether the method needs an adaptive rank allocator (``AllocatorConfig``).
        has_regularizer: Whether :meth:`regularizer` adds a term to the training loss.
        varies_rank: Whether exported ranks differ per module (peft ``rank_pattern`` always written).
        peft_use_dora: peft's ``use_dora`` flag of the exported LoRA.
        inits: Values of ``AdapterConfig.init`` the method supports.
    """

    name: ClassVar[str] = ""
    factor_kinds: ClassVar[tuple[str, ...]] = ()
    rank_axes: ClassVar[dict[str, int]] = {}
    zero_init_kinds: ClassVar[tuple[str, ...]] = ()
    singular_value_kind: ClassVar[str | None] = None
    uses_allocator: ClassVar[bool] = False
    has_regularizer: ClassVar[bool] = False
    varies_rank: ClassVar[bool] = False
    peft_use_dora: ClassVar[bool] = False
    inits: ClassVar[tuple[str, ...]] = ("default",)

    def __init__(self, config: AdapterConfig | None = None) -> None:
        self.config = config

    # -- factors -----------------------------------------------------------------------------
    def factor_shapes(self, d_out: int, d_in: int, r: int) -> dict[str, tuple[int, ...]]:
        """Shape of each factor kind for a ``d_out x d_in`` layer of rank ``r``."""
        raise NotImplementedError

    def init_factors(self, d_out: int, d_in: int, r: int, generator: torch.Generator | None,
                     dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """Initial values of the factors (as peft initialises them)."""
        raise NotImplementedError

    def init_layer(self, layer: AdaptedLinear, w0: torch.Tensor, generator: torch.Generator | None) -> None:
        """Creates the layer's factors (``layer.factors``) and any state the method keeps on it.

        An init that reads ``W0`` may replace the base weight (``layer.set_base_weight``), e.g.
        by a residual.

        Args:
            layer: The new layer (base layer, rank and alpha already set).
            w0: The frozen base weight ``(d_out, d_in)``.
            generator: RNG of the random initialisation (``None``: torch's global RNG).
        """
        init = self.init_factors(layer.out_features, layer.in_features, layer.r, generator, w0.dtype, w0.device)
        layer.factors = nn.ParameterDict({k: nn.Parameter(v) for k, v in init.items()})

    def state_tensors(self, layer: AdaptedLinear) -> dict[str, torch.Tensor]:
        """Method state of a layer beyond its factors, saved as ``<module>.<name>`` (live tensors)."""
        return {}

    def before_load(self, layer: AdaptedLinear, saved: dict[str, torch.Tensor]) -> None:
        """Called with the saved :meth:`state_tensors` of a layer before they are copied in."""

    def output_mask(self, layer: AdaptedLinear, kind: str) -> torch.Tensor | None:
        """A keep-mask over the rank components of generated ``kind`` (``None``: no mask)."""
        return None

    def compact_layer(self, layer: AdaptedLinear, keep: torch.Tensor) -> None:
        """Cuts the method's own per-component layer state to the components ``keep`` (bool ``(r,)``)
        marks (the factors themselves are the source's business). The scale must not change."""

    # -- steps -------------------------------------------------------------------------------
    def bind_layers(self, layers: list[AdaptedLinear]) -> None:
        """Called once when the model is wrapped, with every adapted layer in model order."""

    def after_step(self, layers: list[AdaptedLinear], global_step: int) -> None:
        """What the method does after an optimizer step (e.g. sample the next training rank)."""

    def sampled_rank(self, layers: list[AdaptedLinear]) -> int | None:
        """The rank the next training forward uses when the method samples one (else ``None``)."""
        return None

    def rng_state(self) -> torch.Tensor | None:
        """State of the method's own generator (``None``: the method draws no random numbers)."""
        return None

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restores what :meth:`rng_state` returned."""

    def regularizer(self, layers: list[AdaptedLinear]) -> torch.Tensor | None:
        """The unweighted regulariser over all layers (``None``: the method has none)."""
        return None

    # -- allocator support -------------------------------------------------------------------
    def component_scores(self, kind: str, element: torch.Tensor) -> torch.Tensor:
        """Per-element scores of stacked ``kind`` factors ``(g, *shape)`` -> per component ``(g, r)``.

        The mean over every axis but the rank axis (peft's reduction of AdaLoRA's P and Q).
        """
        rank_dim = 1 + self.rank_axes[kind]
        dims = [d for d in range(1, element.dim()) if d != rank_dim]
        if not dims:
            return element  # already one score per component (a 1-D factor such as lam)
        return element.mean(dim=dims[0] if len(dims) == 1 else dims)

    def combine_component_scores(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """One score per rank component ``(n, r)`` from the per-kind scores of :meth:`component_scores`."""
        raise NotImplementedError(f"method {self.name!r} has no rank allocation")

    # -- forward / merge ---------------------------------------------------------------------
    def scaling(self, layer: AdaptedLinear) -> float:
        """The scalar multiplying the low-rank update in the current mode."""
        raise NotImplementedError

    def effective_factors(self, layer: AdaptedLinear, factors: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Reduces the factors to ``(A, B, scale)`` with ``dW = scale * B @ A``."""
        raise NotImplementedError

    def forward(self, layer: AdaptedLinear, x: torch.Tensor, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Output of the adapted layer: ``W0 x + bias + scale * B A x``."""
        a, b, scale = self.effective_factors(layer, factors)
        x_a = layer.lora_dropout(x) if layer.has_dropout else None
        return layer.lowrank_forward(x, a, b, scale, x_adapter=x_a)

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

    # -- export ------------------------------------------------------------------------------
    def to_lora(self, layer: AdaptedLinear, factors: dict[str, torch.Tensor]) -> LoraExport:
        """The layer as a plain peft LoRA (evaluation semantics), relative to the original ``W0``."""
        raise NotImplementedError


def kaiming_uniform_a(shape: tuple[int, int], generator: torch.Generator | None, dtype, device) -> torch.Tensor:
    """peft's LoRA ``A`` init: ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    fan_in = shape[1]
    bound = 1.0 / fan_in**0.5
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.uniform_(-bound, bound, generator=generator)
