"""The planner's table for Llama-3.1-8B and -70B on 1, 2, 4 and 8 GPUs (BENCHMARKS.md, "Planning").

AdaLoRA r = 16 on all 7 linears of every block, the default hypernetwork (attention body,
``rank`` layout, h = 128) and the ``rows`` layout at the paper's h = 312 for contrast, both
generating once per optimizer step (``generate="per_step"``); a global batch of 16 sequences of
2,048 tokens, micro-batch 1 per GPU (accumulating the rest), activation checkpointing on; bf16 and
4-bit (NF4, double quantisation) bases; 80 GiB devices. No GPU is needed: every figure is
computed (``hyperadalora plan`` for one setup, docs/plan.md).

Usage::

    hyperadalora bench plan_scale        # writes results/plan_scale.json / .md
"""

from __future__ import annotations

import argparse

import hyperadalora as ha
from hyperadalora.plan import PRESETS, TrainSetup, make_plan

from ..experiment import Command, experiment
from .common import write_results
from .plan_calibrate import SECTION

MODELS = ("llama-8b", "llama-70b")
GPUS = (1, 2, 4, 8)
PRECISIONS = ("bf16", "4bit")
# generate="per_step": one generation per optimizer step on each GPU, however many micro-batches
# it accumulates (per_forward would run it for every micro-batch).
SOURCES = {"direct": ha.HyperConfig(), "hyper": ha.HyperConfig(generate="per_step"),
           "hyper-rows": ha.HyperConfig(tokens="rows", hidden=312, generate="per_step")}
GIB = 2**30


def adapter(source: str) -> ha.AdapterConfig:
    """AdaLoRA r = 16 on all linears with the source's hypernetwork settings."""
    return ha.AdapterConfig(method="adalora", r=16, source="direct" if source == "direct" else "hyper",
                            allocator=ha.AllocatorConfig(total_step=1000, target_r=8), hyper=SOURCES[source])


def render(result: dict) -> list[str]:
    """A compact table (one row per model x precision x source), then every plan's row."""
    plans = {(r["model"], r["setup"]["precision"], r["source_label"], r["setup"]["gpus"]): r for r in result["rows"]}
    lines = ["Planned per-GPU memory and FLOPs per optimizer step (`hyperadalora bench plan_scale`): "
             "AdaLoRA r=16 on all linears, batch 16 x 2048 tokens, micro-batch 1 per GPU, activation "
             "checkpointing, AdamW, FSDP full shard; hyper = the default hypernetwork (attention, rank layout, "
             "h=128), hyper-rows = the rows layout at h=312, both generating once per step on every GPU "
             "(generate=per_step). (no): over 80 GiB.", "",
             "| model | precision | source | " + " | ".join(f"GiB/GPU, {g} GPU{'s' if g > 1 else ''}" for g in GPUS)
             + " | TFLOP/step, 1 GPU | hypernetwork share, 1 / 8 GPUs |", "|---" * (4 + len(GPUS)) + "|---|"]
    for model in MODELS:
        for precision in PRECISIONS:
            for source in SOURCES:
                row = [plans[(model, precision, source, g)] for g in GPUS]
                mem = " | ".join(f"{p['memory_gib_per_device']:.1f}{'' if p['fits'] else ' (no)'}" for p in row)
                lines.append(f"| {model} | {precision} | {source} | {mem} | {row[0]['flops_total'] / 1e12:,.0f} | "
                             f"{100 * row[0]['hyper_share']:.2g}% / {100 * row[-1]['hyper_share']:.2g}% |")
    lines += ["", "| model | precision | source | GPUs | micro-batch x accum | GiB / GPU | fits 80 GiB | TFLOP / step "
              "| TFLOP / GPU | hypernetwork share |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, precision, source, gpus), p in plans.items():
        s = p["setup"]
        per_gpu = -(-s["batch"] // gpus)  # ceil division, as the plan splits the batch
        accum = -(-per_gpu // s["micro_batch"])
        lines.append(f"| {model} | {precision} | {source} | {gpus} | {s['micro_batch']} x {accum} | "
                     f"{p['memory_gib_per_device']:.1f} | {'yes' if p['fits'] else 'no'} | "
                     f"{p['flops_total'] / 1e12:,.1f} | {p['flops_per_device'] / 1e12:,.1f} | "
                     f"{100 * p['hyper_share']:.2g}% |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of :func:`main` (none but the result name)."""
    p = argparse.ArgumentParser(prog="hyperadalora bench plan_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="plan_scale")
    return p.parse_args(argv)


@experiment("plan_scale", section=SECTION, title="planned memory and FLOPs of Llama-3.1-8B / 70B on 1-8 GPUs",
            parse_args=parse_args, render=render, data=False, commands=[Command("plan_scale")])
def main(argv: list[str] | None = None) -> int:
    """Plans every setup and writes ``results/<name>.json`` / ``.md``."""
    args = parse_args(argv)
    rows = []
    for model in MODELS:
        for precision in PRECISIONS:
            for source in SOURCES:
                for gpus in GPUS:
                    setup = TrainSetup(batch=16, seq_len=2048, gpus=gpus, micro_batch=1, precision=precision,
                                       checkpointing=True)
                    plan = make_plan(PRESETS[model], adapter(source), setup).to_dict()
                    # The shape and adapter settings are the same in many rows: stored once below.
                    rows.append({**{k: v for k, v in plan.items() if k not in ("shape", "adapter")},
                                 "source_label": source})
    result = {"shapes": {m: PRESETS[m].__dict__ for m in MODELS},
              "adapters": {s: adapter(s).to_dict() for s in SOURCES}, "rows": rows}
    table = render(result)
    print(write_results(args.name, result, table))
    print("\n".join(table))
    return 0
