"""The interface every rank-allocation policy implements, and the policy registry.

A policy decides each adapted module's rank. An *adaptive* policy (``adalora``, ``sigma-grad``)
re-decides it during training from importance scores (:meth:`RankPolicy.update_and_allocate`
after each optimizer step); a fixed one never changes the ranks. A policy that decides ranks once
before training (e.g. from a calibration pass) does its work in :meth:`RankPolicy.calibrate`,
called before the first training step, and is not adaptive afterwards. A policy that decides
ranks before the adapters even exist (``sensitivity``: adapters are then *created* at their
ranks) sets ``decides_before_wrap`` and implements :meth:`RankPolicy.prepare_config`, which the
wrap calls on the base model; :meth:`RankPolicy.training_policy` names the class that then
runs during training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from ..config import AdapterConfig, AllocatorConfig
    from ..layers import AdaptedLinear
    from ..methods import AdapterMethod
    from ..sources import FactorSource


class RankPolicy:
    """Base class of the rank-allocation policies.

    Args:
        layers: The adapted layers by module name, in model order.
        config: The allocator settings (``None`` for the fixed policy).
        method: The adapter method (which kind holds the singular values, how scores combine).
        source: The factor source (values and gradients of the factors).

    Attributes:
        name: The policy name as used in ``AllocatorConfig.policy``.
        adaptive: Whether ranks change during training (``after_step`` must run).
        decides_before_wrap: Whether the policy decides per-module ranks on the base model
            before the adapters are created (:meth:`prepare_config`).
        budget: The rank budget (sum of live rank components) as of the last call.
        rank_pattern: ``{module: [kept?] * r}`` as of the last allocation (``None`` before).
        steps_seen: Number of :meth:`update_and_allocate` calls so far.
    """

    name: ClassVar[str] = ""
    adaptive: ClassVar[bool] = False
    decides_before_wrap: ClassVar[bool] = False

    @classmethod
    def training_policy(cls, config: AllocatorConfig) -> type[RankPolicy]:
        """The class that allocates during training under ``config`` (the policy itself by default)."""
        return cls

    @classmethod
    def prepare_config(cls, config: AdapterConfig, model: torch.nn.Module, target_names: list[str], batches: Any
                       ) -> tuple[AdapterConfig, Any]:
        """The adapter config with per-module ranks decided on the base ``model``'s ``target_names``
        (before the wrap), and a record of the decision with a ``to_dict()`` (``None``: nothing decided, ``config`` unchanged)."""
        return config, None

    def __init__(self, layers: dict[str, AdaptedLinear], config: AllocatorConfig | None, method: AdapterMethod,
                 source: FactorSource) -> None:
        self.config = config
        self.method = method
        self.source = source
        self.names = list(layers)
        self.layers = list(layers.values())
        self.init_bgt = sum(layer.r for layer in self.layers)
        self.budget = self.init_bgt
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.steps_seen = 0
        self.last_step: int | None = None

    def calibrate(self, model: torch.nn.Module, batches: Any) -> None:
        """Decides ranks before training from calibration batches (a no-op for in-training policies)."""

    def check_step_order(self, global_step: int) -> None:
        """Refuses a step not larger than the last one: a repeated step would count its importance
        twice, an earlier one would run the budget schedule backwards."""
        if self.last_step is not None and global_step <= self.last_step:
            raise ValueError(f"after_step({global_step}) after after_step({self.last_step}): steps must increase, "
                             "one call per optimizer step (a resumed or loaded model continues after its last step)")

    def update_and_allocate(self, global_step: int) -> int:
        """One allocation step after ``optimizer.step()``; returns the budget in force."""
        raise NotImplementedError

    def ranks(self) -> dict[str, int]:
        """Current rank of every module."""
        if self.rank_pattern is None:
            return {n: layer.r for n, layer in zip(self.names, self.layers)}
        return {n: int(sum(keep)) for n, keep in self.rank_pattern.items()}

    def keep_pattern(self) -> dict[str, list[bool]]:
        """``{module: [kept?] * r}`` now (all ``True`` for a fixed policy)."""
        return {n: [True] * layer.r for n, layer in zip(self.names, self.layers)}

    def total_rank(self) -> int:
        """Number of live rank components."""
        return sum(sum(keep) for keep in self.keep_pattern().values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors of the policy state (for checkpoints)."""
        return {}

    def compaction_enabled(self) -> bool:
        """Whether this policy cuts pruned components away (``AllocatorConfig.compact``)."""
        return False

    def compaction_due(self) -> bool:
        """Whether pruning is final and the factors have not been cut to the kept components yet."""
        return False

    def kept_components(self) -> list[torch.Tensor]:
        """Per layer, a bool ``(r,)`` of the components to keep (all of them for a fixed policy)."""
        return [torch.ones(layer.r, dtype=torch.bool) for layer in self.layers]

    def mark_compacted(self) -> None:
        """Called after the layers were cut to :meth:`kept_components` (the layers' ``r`` is updated)."""

    def meta_dict(self) -> dict:
        """JSON-compatible policy state (for checkpoints)."""
        return {"budget": self.budget, "rank_pattern": self.rank_pattern, "steps_seen": self.steps_seen,
                "last_step": self.last_step}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restores what :meth:`state_dict` and :meth:`meta_dict` saved."""
        self.budget = meta["budget"]
        self.rank_pattern = meta["rank_pattern"]
        self.steps_seen = meta["steps_seen"]
        self.last_step = meta.get("last_step")


POLICY_REGISTRY: dict[str, type[RankPolicy]] = {}
"""The policies ``AllocatorConfig.policy`` may name, by name."""


def register_policy(cls: type[RankPolicy]) -> type[RankPolicy]:
    """Class decorator: makes a policy selectable by its ``name``."""
    POLICY_REGISTRY[cls.name] = cls
    return cls
