"""Memory and FLOP planning for adapter training at scale (``hyperadalora plan``; docs/plan.md).

Example::

    from hyperadalora import AdapterConfig
    from hyperadalora.plan import TrainSetup, make_plan, resolve_shape
    plan = make_plan(resolve_shape("llama-8b"), AdapterConfig(method="lora", r=16),
                     TrainSetup(batch=16, seq_len=2048, gpus=4, precision="4bit", checkpointing=True))
    plan.memory_total / 2**30, plan.flops_total, plan.hyper_share
"""

from .adapters import AdapterCounts, FactorGroup, count_adapters, hypernetwork_params
from .planner import Plan, make_plan
from .setup import PRECISIONS, TrainSetup
from .shapes import PRESETS, Linear, ModelShape, PlanInputError, resolve_shape, shape_from_hf_config

__all__ = ["PRECISIONS", "PRESETS", "AdapterCounts", "FactorGroup", "Linear", "ModelShape", "Plan", "PlanInputError",
           "TrainSetup", "count_adapters", "hypernetwork_params", "make_plan", "resolve_shape", "shape_from_hf_config"]
