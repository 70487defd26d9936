"""Rank allocation: one module per policy behind one interface (:class:`RankPolicy`).

* ``adalora`` (:mod:`.adalora`): peft / AdaLoRA's smoothed sensitivity x uncertainty scores.
* ``sigma-grad`` (:mod:`.sigma_grad`): HyperAdaLoRA's ``|sigma * dL/dsigma|``, pruned for good.
* ``sensitivity`` (:mod:`.sensitivity`): Sensitivity-LoRA's one-shot ranks from a calibration
  pass on the base model, decided before the wrap (``AdapterConfig.rank_pattern``).
* :class:`FixedRanks`: the policy of methods without rank allocation (LoRA, DoRA, DyLoRA), so a
  wrapped model always holds an allocator (``model.allocator.adaptive`` tells them apart).

A policy is registered by name (:func:`register_policy`); ``AllocatorConfig.policy`` accepts the
names of :data:`POLICY_REGISTRY`. This package imports nothing else of hyperadalora at import
time, so :mod:`hyperadalora.config` can derive its list from the registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .adalora import AdaLoRAPolicy
from .base import POLICY_REGISTRY, RankPolicy, register_policy
from .fixed import FixedRanks
from .masked import MaskedAllocator
from .sensitivity import SensitivityPolicy, SensitivityReport, calibrate_sensitivity, sensitivity_rank_pattern
from .sigma_grad import SigmaGradPolicy

if TYPE_CHECKING:
    from ..config import AdapterConfig, AllocatorConfig
    from ..layers import AdaptedLinear
    from ..methods import AdapterMethod
    from ..sources import FactorSource

RankAllocator = MaskedAllocator
"""The in-training allocators' common class (the name of the single allocator of earlier versions)."""


def build_allocator(layers: dict[str, AdaptedLinear], config: AllocatorConfig | None, method: AdapterMethod,
                    source: FactorSource) -> RankPolicy:
    """The policy ``config.policy`` names, or :class:`FixedRanks` when there is no allocator config."""
    if config is None:
        return FixedRanks(layers, None, method, source)
    policy = POLICY_REGISTRY[config.policy].training_policy(config)
    return policy(layers, config, method, source)


def policy_decides_before_wrap(config: AdapterConfig) -> bool:
    """Whether ``config``'s policy still has to decide ranks on the base model (no ``rank_pattern`` yet)."""
    alloc = config.allocator
    return alloc is not None and POLICY_REGISTRY[alloc.policy].decides_before_wrap and config.rank_pattern is None


__all__ = ["AdaLoRAPolicy", "FixedRanks", "MaskedAllocator", "POLICY_REGISTRY", "RankAllocator", "RankPolicy",
           "SensitivityPolicy", "SensitivityReport", "SigmaGradPolicy", "build_allocator", "calibrate_sensitivity",
           "policy_decides_before_wrap", "register_policy", "sensitivity_rank_pattern"]
