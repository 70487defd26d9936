"""Per-device memory terms and per-step FLOPs of one training setup.

Memory (bytes per device): frozen base weights at the precision's bytes per parameter;
trainable parameters (adapters, hypernetworks, a task head) as fp32 master weights, fp32
gradients and AdamW's two fp32 moments; AdaLoRA's allocator keeps two fp32 EMAs per factor
element; activations (:mod:`.activations`); FSDP shards every parameter-sized term across the
devices and holds two blocks' unsharded weights (the one computing and the one prefetched);
a fixed overhead. A hypernetwork source adds what each device holds whole: the factor states
(and anchors), the generated factors and their gradients, and the hypernetworks' activations
(every device generates every factor: the generation is replicated, not sharded).

FLOPs per optimizer step (2 per multiply-add): a frozen linear costs ``2 N P`` forward and
``2 N P`` backward (the input gradient only; no weight gradient), so ``4 N P`` rather than
the ``6 N P`` of a trained one; adapters ``6 N r (d_in + d_out)``; attention maps
``4 N s q_dim`` forward per block (half for causal masks), three times that with the backward;
checkpointing adds one more forward of the blocks; the hypernetworks run once per forward
(``per_forward``) or per step (``per_step``) on every device (:mod:`.hyper_cost`).
"""

from __future__ import annotations

from ..config import AdapterConfig
from ..methods import method_class
from .activations import activation_terms
from .adapters import AdapterCounts, hypernetwork_params
from .hyper_cost import generation_activation_bytes, generation_flops
from .setup import TrainSetup
from .shapes import ModelShape

FP32 = 4
# fp32 master weights, fp32 gradients, AdamW's two fp32 moments.
TRAINED_BYTES = {"trainable_weights": FP32, "gradients": FP32, "optimizer": 2 * FP32}


def _direct_terms(counts: AdapterCounts, config: AdapterConfig, setup: TrainSetup) -> dict[str, float]:
    return {"trainable_params": counts.factor_params, "hyper_params": {}, "replicated_bytes": {}, "generations": 0}


def _hyper_terms(counts: AdapterCounts, config: AdapterConfig, setup: TrainSetup) -> dict[str, float]:
    hyper = config.hyper
    copies = 2 if hyper.mode == "anchored" else 1  # state (+ anchor)
    per_step = hyper.generate == "per_step"
    params = hypernetwork_params(counts, hyper)
    return {"trainable_params": sum(params.values()), "hyper_params": params,
            "replicated_bytes": {"factor_states": copies * FP32 * counts.factor_params,
                                 "generated_factors": 2 * FP32 * counts.factor_params,  # F and dL/dF
                                 "hypernetwork_activations": generation_activation_bytes(counts, hyper)},
            "generations": 1 if per_step else setup.accumulation}


# What each factor source costs: trainable parameters, what every device holds whole, and how
# many hypernetwork generations a device runs per optimizer step.
SOURCE_TERMS = {"direct": _direct_terms, "hyper": _hyper_terms}


def base_weight_bytes(shape: ModelShape, counts: AdapterCounts, setup: TrainSetup) -> tuple[float, float]:
    """(all frozen base bytes, one block's unsharded bytes)."""
    block_linears = shape.block_linears()
    block_w = sum(lin.d_out * lin.d_in for lin in block_linears)
    block_rows = sum(lin.d_out for lin in block_linears)
    pc = shape.param_counts()
    block_other = pc["blocks"] / shape.layers - block_w
    one_block = setup.linear_weight_bytes(block_w, block_rows) + block_other * setup.other_weight_bytes
    trained_head = counts.head_params
    other = pc["total"] - shape.layers * block_w - trained_head
    total = shape.layers * setup.linear_weight_bytes(block_w, block_rows) + other * setup.other_weight_bytes
    return total, one_block


def memory_terms(shape: ModelShape, counts: AdapterCounts, config: AdapterConfig,
                 setup: TrainSetup) -> dict[str, float]:
    """Bytes per device, by term (see the module docstring)."""
    src = SOURCE_TERMS[config.source](counts, config, setup)
    trainable = src["trainable_params"] + counts.extra_params + counts.head_params
    n = setup.gpus
    base, one_block = base_weight_bytes(shape, counts, setup)
    terms = {"base_weights": base / n, "fsdp_buffers": 2 * one_block if n > 1 else 0.0}
    terms.update({name: trainable * b / n for name, b in TRAINED_BYTES.items()})
    terms["allocator_state"] = 2 * FP32 * counts.factor_params if method_class(config.method).uses_allocator else 0.0
    terms.update(src["replicated_bytes"])
    terms.update({f"activations_{k}": v for k, v in activation_terms(shape, counts, setup).items()})
    terms["overhead"] = setup.overhead_gib * 2**30
    return terms


# Terms a training step creates (what a peak-RSS growth measurement around the steps sees).
STEP_TERMS = ("gradients", "optimizer", "allocator_state", "generated_factors", "hypernetwork_activations",
              "activations_blocks", "activations_head", "activations_transient")


def flop_terms(shape: ModelShape, counts: AdapterCounts, config: AdapterConfig,
               setup: TrainSetup) -> dict[str, float]:
    """FLOPs per optimizer step, all devices together, by term."""
    tokens = setup.batch * setup.seq_len
    block_w = sum(lin.d_out * lin.d_in for lin in shape.block_linears())
    linears = 4 * tokens * shape.layers * block_w
    if shape.task == "causal-lm":
        head = 4 * tokens * shape.vocab * shape.hidden
    else:
        head = 6 * setup.batch * counts.head_params
    causal = 0.5 if shape.task == "causal-lm" else 1.0
    attn_fwd = 4 * tokens * setup.seq_len * shape.q_dim * causal * shape.layers
    adapters = 6 * tokens * counts.factor_params
    recompute = (2 * tokens * shape.layers * block_w + attn_fwd + 2 * tokens * counts.factor_params
                 if setup.checkpointing else 0.0)
    src = SOURCE_TERMS[config.source](counts, config, setup)
    hyper = src["generations"] * setup.gpus * generation_flops(counts, config.hyper) if src["generations"] else 0.0
    return {"base_linears": linears, "head": head, "attention": 3 * attn_fwd, "adapters": adapters,
            "recompute": recompute, "hypernetworks": hyper}
