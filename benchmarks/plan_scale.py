"""The planner's table for Llama-3.1-8B and -70B on 1, 2, 4 and 8 GPUs (BENCHMARKS.md, "Planning").

AdaLoRA r = 16 on all 7 linears of every block, the default hypernetwork (attention body,
``rank`` layout, h = 128) and the ``rows`` layout at the paper's h = 312 for contrast, both
generating once per optimizer step (``generate="per_step"``); a global
batch of 16 sequences of 2,048 tokens, micro-batch 1 per GPU (accumulating the rest), activation
checkpointing on; bf16 and 4-bit (NF4, double quantisation) bases; 80 GB devices. No GPU is
needed: every figure is computed (``hyperadalora plan`` for one setup, docs/plan.md).

Usage::

    python benchmarks/plan_scale.py        # writes results/plan_scale.json / .md
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

import hyperadalora as ha  # noqa: E402
from hyperadalora.plan import PRESETS, TrainSetup, make_plan  # noqa: E402
from hyperadalora.plan.report import GRID_HEADER, grid_row  # noqa: E402

MODELS = ("llama-8b", "llama-70b")
GPUS = (1, 2, 4, 8)
PRECISIONS = ("bf16", "4bit")
# generate="per_step": one generation per optimizer step on each GPU, however many micro-batches
# it accumulates (per_forward would run it for every micro-batch).
SOURCES = {"direct": ha.HyperConfig(), "hyper": ha.HyperConfig(generate="per_step"),
           "hyper-rows": ha.HyperConfig(tokens="rows", hidden=312, generate="per_step")}


def adapter(source: str) -> ha.AdapterConfig:
    return ha.AdapterConfig(method="adalora", r=16, source="direct" if source == "direct" else "hyper",
                            allocator=ha.AllocatorConfig(total_step=1000, target_r=8), hyper=SOURCES[source])


def compact(plans: dict[tuple[str, str, str, int], object]) -> list[str]:
    """One row per model x precision x source: GiB per GPU (fits?) on 1-8 GPUs, TFLOP, hypernetwork share."""
    lines = ["| model | precision | source | " + " | ".join(f"GiB/GPU, {g} GPU{'s' if g > 1 else ''}" for g in GPUS)
             + " | TFLOP/step, 1 GPU | hypernetwork share, 1 / 8 GPUs |", "|---" * (4 + len(GPUS)) + "|---|"]
    for model in MODELS:
        for precision in PRECISIONS:
            for source in SOURCES:
                row = [plans[(model, precision, source, g)] for g in GPUS]
                mem = " | ".join(f"{p.memory_total / 2**30:.1f}{'' if p.fits else ' (no)'}" for p in row)
                lines.append(f"| {model} | {precision} | {source} | {mem} | {row[0].flops_total / 1e12:,.0f} | "
                             f"{100 * row[0].hyper_share:.2g}% / {100 * row[-1].hyper_share:.2g}% |")
    return lines


def main() -> None:
    plans = {}
    for model in MODELS:
        for precision in PRECISIONS:
            for source in SOURCES:
                for gpus in GPUS:
                    setup = TrainSetup(batch=16, seq_len=2048, gpus=gpus, micro_batch=1, precision=precision,
                                       checkpointing=True)
                    plans[(model, precision, source, gpus)] = make_plan(PRESETS[model], adapter(source), setup)
    table = ["Planned per-GPU memory and FLOPs per optimizer step (`python benchmarks/plan_scale.py`): "
             "AdaLoRA r=16 on all linears, batch 16 x 2048 tokens, micro-batch 1 per GPU, activation "
             "checkpointing, AdamW, FSDP full shard; hyper = the default hypernetwork (attention, rank layout, "
             "h=128), hyper-rows = the rows layout at h=312, both generating once per step on every GPU "
             "(generate=per_step). (no): over 80 GiB.", "", *compact(plans), "", *GRID_HEADER]
    table += [grid_row(p) for p in plans.values()]
    print(write_results("plan_scale", {"rows": [p.to_dict() for p in plans.values()]}, table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
