"""A plan: parameter counts, per-device memory and per-step FLOPs of one training setup."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AdapterConfig
from .adapters import AdapterCounts, count_adapters
from .costs import SOURCE_TERMS, STEP_TERMS, flop_terms, memory_terms
from .setup import TrainSetup
from .shapes import ModelShape

GIB = 2**30


@dataclass(frozen=True)
class Plan:
    """The planner's answer for one model, adapter and setup.

    Attributes:
        shape: The model.
        adapter: The adapter settings.
        setup: Batch, devices, precision, checkpointing.
        counts: Adapted linears and adapter parameters.
        hyper_params: Hypernetwork parameters by factor kind (empty for ``direct``).
        memory: Bytes per device by term.
        flops: FLOPs per optimizer step (all devices) by term.
    """

    shape: ModelShape
    adapter: AdapterConfig
    setup: TrainSetup
    counts: AdapterCounts
    hyper_params: dict[str, int]
    memory: dict[str, float]
    flops: dict[str, float]

    @property
    def memory_total(self) -> float:
        """Peak bytes per device."""
        return sum(self.memory.values())

    @property
    def step_memory(self) -> float:
        """Bytes a training step creates (gradients, optimizer and allocator state, activations)."""
        return sum(self.memory.get(k, 0.0) for k in STEP_TERMS)

    @property
    def fits(self) -> bool:
        """Whether the peak fits in the device's memory."""
        return self.memory_total <= self.setup.device_gib * GIB

    @property
    def flops_total(self) -> float:
        return sum(self.flops.values())

    @property
    def flops_per_device(self) -> float:
        """FLOPs one device runs per step: its share of the model's work plus its own generation."""
        return self.flops_total / self.setup.gpus  # every device generates: the hypernetworks' total is gpus x one

    @property
    def hyper_share(self) -> float:
        """The hypernetworks' share of the step's FLOPs."""
        return self.flops["hypernetworks"] / self.flops_total if self.flops_total else 0.0

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        pc = self.shape.param_counts()
        return {"model": self.shape.name, "shape": self.shape.__dict__, "adapter": self.adapter.to_dict(),
                "setup": self.setup.__dict__,
                "params": {"base": pc, "adapted_linears": self.counts.modules,
                           "adapter_factors": self.counts.factor_params, "adapter_extra": self.counts.extra_params,
                           "trained_head": self.counts.head_params, "hypernetworks": self.hyper_params},
                "memory_bytes": self.memory, "memory_gib_per_device": self.memory_total / GIB,
                "step_memory_bytes": self.step_memory, "fits": self.fits,
                "flops": self.flops, "flops_total": self.flops_total, "flops_per_device": self.flops_per_device,
                "hyper_share": self.hyper_share}


def make_plan(shape: ModelShape, adapter: AdapterConfig, setup: TrainSetup) -> Plan:
    """Counts parameters and computes memory and FLOPs of training ``shape`` with ``adapter``."""
    counts = count_adapters(shape, adapter)
    hyper = SOURCE_TERMS[adapter.source](counts, adapter, setup)["hyper_params"]
    return Plan(shape, adapter, setup, counts, hyper, memory_terms(shape, counts, adapter, setup),
                flop_terms(shape, counts, adapter, setup))
