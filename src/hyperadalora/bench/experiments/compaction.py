"""AdaLoRA that pays for what it keeps (issue 23, item 4): the step after the final budget.

Per model, four variants live in one process and take turns step by step (round-robin):

* ``adalora_compact``: ours with ``AllocatorConfig.compact="final"``: once the final budget is
  fixed the factors and their AdamW state are cut to the kept components;
* ``adalora_masked``: ours without compaction (peft's semantics: masked at the initial rank);
* ``lora_same_ranks``: our plain LoRA cut to exactly the per-module ranks the compacted AdaLoRA
  kept (rank-0 modules run their base layer alone in both);
* ``peft_adalora``: peft's AdaLoRA at the same settings.

Settings: init_r 12, target_r 8, gamma 0.5, alpha 16, AdamW lr 1e-4; the schedule is squeezed so the
final budget is fixed at step ``--final`` (``total_step = 1000``, ``tfinal = 1000 - final``), and
every variant takes ``--final + 1 + --warmup`` untimed steps before the timed ones, so each timed
step is a step after the final budget (peft then re-applies its rank pattern each step).
MiniLM (its 36 encoder linears, sequence classification, batch 16 x 128) and SmolLM2-135M (all
seven linears of its 30 layers, causal LM, batch 4 x 256), random tokens. The figure is the median
of the interleaved steps; ``optimizer_state_bytes`` counts AdamW's tensors after the timed steps.

Usage::

    hyperadalora bench compaction [--quick] [--models minilm,smollm2] [--steps 4]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from ..experiment import Command, experiment
from ..report import machine, markdown_table, versions
from ..stats import mean_ci
from .common import MINILM_ENCODER_LINEARS, comma_choices, write_results
from .step_model import make_step, time_interleaved

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
VARIANTS = ("adalora_compact", "adalora_masked", "lora_same_ranks", "peft_adalora")
TOTAL_STEP = 1000
MODELS = {  # name: (task, target modules, batch size, sequence length)
    "minilm": ("sequence-classification", MINILM_ENCODER_LINEARS, 16, 128),
    "smollm2": ("causal-lm", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 4, 256),
}


def saved_heads(targets) -> tuple[str, ...]:
    """The trained head of ours, as peft's SEQ_CLS task trains its classifier (none for a causal LM)."""
    return ("classifier",) if targets is MINILM_ENCODER_LINEARS else ()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of :func:`main`."""
    p = argparse.ArgumentParser(prog="hyperadalora bench compaction", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="MiniLM only, 2 timed steps")
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the final budget")
    p.add_argument("--final", type=int, default=3, help="the step at which the final budget is fixed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or the process's CPU time (with --threads 1: the work done on a shared machine)")
    p.add_argument("--alternate", action="store_true", help="reverse the variants' order every other round")
    p.add_argument("--name", default="compaction")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.steps = "minilm", 2
    args.model_list = comma_choices(p, args.models, MODELS, "models")
    return args


def adalora(base: torch.nn.Module, targets, compact: str, final: int):
    """Ours: AdaLoRA 12 -> 8 whose final budget is fixed at step ``final``."""
    import hyperadalora as ha

    alloc = ha.AllocatorConfig(total_step=TOTAL_STEP, target_r=8, tinit=0, tfinal=TOTAL_STEP - final, deltaT=1,
                               compact=compact)
    return ha.wrap(copy.deepcopy(base), ha.AdapterConfig(method="adalora", r=12, lora_alpha=16, gamma=0.5, seed=0,
                                                         target_modules=targets, modules_to_save=saved_heads(targets),
                                                         allocator=alloc))


def lora_at(base: torch.nn.Module, targets, ranks: dict[str, int]):
    """Our plain LoRA with each module cut to ``ranks[module]`` (A's rows, B's columns)."""
    import hyperadalora as ha
    from ...allocation.compaction import slice_parameter_

    model = ha.wrap(copy.deepcopy(base), ha.AdapterConfig(method="lora", r=12, lora_alpha=16, seed=0,
                                                          target_modules=targets, modules_to_save=saved_heads(targets)))
    for name, layer in model.adapted_layers.items():
        index = torch.arange(ranks[name])
        slice_parameter_(layer.factors["A"], index, 0)
        slice_parameter_(layer.factors["B"], index, 1)
        layer.r = ranks[name]
    return model


def peft_adalora(base: torch.nn.Module, targets, task: str, final: int):
    """peft's AdaLoRA at the same settings."""
    import peft

    cfg = peft.AdaLoraConfig(init_r=12, target_r=8, total_step=TOTAL_STEP, tinit=0, tfinal=TOTAL_STEP - final,
                             deltaT=1, orth_reg_weight=0.5, lora_alpha=16, lora_dropout=0.0,
                             target_modules=list(targets) if not isinstance(targets, str) else targets,
                             task_type="SEQ_CLS" if task == "sequence-classification" else "CAUSAL_LM")
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def make_batch(task: str, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Random tokens (labels: classes, or the tokens themselves for a causal LM)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch_size, seq_len), generator=g)
    labels = torch.randint(0, 2, (batch_size,), generator=g) if task == "sequence-classification" else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def measure_model(name: str, args: argparse.Namespace) -> dict:
    """Times the four variants of one model, interleaved; returns its result row."""
    from ...models import load_model

    task, targets, batch_size, seq_len = MODELS[name]
    base, _ = load_model(name, task=task, num_labels=2)
    batch = make_batch(task, batch_size, seq_len)
    steps: dict[str, tuple] = {}
    compact = adalora(base, targets, "final", args.final)
    steps["adalora_compact"] = make_step(compact, "adalora_compact")
    steps["adalora_masked"] = make_step(adalora(base, targets, "off", args.final), "adalora_masked")
    steps["peft_adalora"] = make_step(peft_adalora(base, targets, task, args.final), "peft_adalora")
    for v in ("adalora_compact", "adalora_masked", "peft_adalora"):  # through the final budget
        for _ in range(args.final + 1):
            steps[v][0](batch)
    ranks = compact.ranks
    assert compact.allocator.compacted, "the final budget did not compact the model"
    steps["lora_same_ranks"] = make_step(lora_at(base, targets, ranks), "lora_same_ranks")
    del base
    times = time_interleaved({v: steps[v][0] for v in VARIANTS}, batch, args.steps, args.warmup, progress=True,
                             clock=CLOCKS[args.clock], alternate=args.alternate)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    state = {v: steps[v][2]() for v in VARIANTS}
    return {"model": name, "batch": f"{batch_size} x {seq_len}", "modules": len(ranks),
            "kept_rank": sum(ranks.values()), "initial_rank": 12 * len(ranks),
            "rank0_modules": sum(r == 0 for r in ranks.values()), "median_s": med,
            "times_s": times, "optimizer_state_bytes": state,
            "ratios": {"compact_vs_lora_same_ranks": med["adalora_compact"] / med["lora_same_ranks"],
                       "compact_vs_peft_adalora": med["adalora_compact"] / med["peft_adalora"],
                       "compact_vs_masked": med["adalora_compact"] / med["adalora_masked"],
                       "state_compact_vs_masked": state["adalora_compact"] / state["adalora_masked"],
                       "kept_fraction": sum(ranks.values()) / (12 * len(ranks))}}


PAIRS = (("adalora_compact", "lora_same_ranks"), ("adalora_compact", "peft_adalora"),
         ("lora_same_ranks", "peft_adalora"), ("adalora_compact", "adalora_masked"))


def interval(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """``mean [low, high]`` (95%, t) of ``values`` times ``scale``; the mean alone for one value."""
    mean, half = mean_ci([v * scale for v in values])
    return f"{mean:.{digits}f}" if half is None else f"{mean:.{digits}f} [{mean - half:.{digits}f}, {mean + half:.{digits}f}]"


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> str:
    """``a / b`` step by step (round i against round i): ``mean [low, high]`` of the ratios."""
    return interval([x / y for x, y in zip(times[a], times[b])])


def render(result: dict) -> list[str]:
    """The tables of a compaction result."""
    c = result["config"]
    clock = " (process CPU time)" if c.get("clock") == "cpu" else ""  # wall time: the older results' header
    order = ", the order reversed every other round" if c.get("alternate") else ""
    head = (f"Median of {c['steps']} interleaved steps{clock} after the final budget (AdaLoRA 12 -> 8, gamma 0.5)"
            f"{order}, {c['threads']} threads ({result['machine']['device']}); load average {c['load']} at the start.")
    rows, ratios = [], []
    for m in result["models"]:
        for v in VARIANTS:
            rows.append([m["model"], m["batch"], v, f"{m['median_s'][v]:.3f}",
                         f"{m['optimizer_state_bytes'][v] / 2**20:.2f}"])
        r = m["ratios"]
        floor = m["median_s"]["lora_same_ranks"] / m["median_s"]["peft_adalora"]
        ratios.append([m["model"], f"{m['kept_rank']} / {m['initial_rank']} ({m['rank0_modules']} at rank 0)",
                       f"{r['compact_vs_lora_same_ranks']:.3f}", f"{r['compact_vs_peft_adalora']:.3f}", f"{floor:.3f}",
                       f"{r['compact_vs_masked']:.3f}", f"{r['state_compact_vs_masked']:.3f}",
                       f"{r['kept_fraction']:.3f}"])
    paired = [[m["model"], *(paired_ratio(m["times_s"], a, b) for a, b in PAIRS)] for m in result["models"]]
    return [head, "", *markdown_table(["model", "batch", "variant", "median s/step", "optimizer state MiB"], rows),
            "", "Per-step ratios (each step against the same round's step of the other variant): mean and 95% "
            "interval (t) over the rounds.", "",
            *markdown_table(["model", *(f"{a} / {b}" for a, b in PAIRS)], paired),
            "", *markdown_table(["model", "kept rank", "compact / LoRA same ranks (goal <= 1.02)",
                                 "compact / peft AdaLoRA (goal <= 0.8)", "LoRA same ranks / peft AdaLoRA",
                                 "compact / masked",
                                 "optimizer state compact / masked", "kept fraction"], ratios)]


@experiment("compaction", section="### Compacted AdaLoRA: the step after the final budget (issue 23, item 4)",
            title="AdaLoRA compacted to its kept ranks vs LoRA at those ranks vs peft's AdaLoRA",
            parse_args=parse_args, render=render, data=False,
            commands=[Command("compaction", ("--models", "minilm", "--steps", "3", "--final", "1")),
                      # Again on a quiet machine (load 0.5), SmolLM2 as well, 10 interleaved steps.
                      Command("compaction_quiet", ("--models", "minilm,smollm2", "--steps", "10", "--final", "1",
                                                   "--name", "compaction_quiet")),
                      # One thread, process CPU time: the work of each step, beside other jobs.
                      Command("compaction_cpu", ("--models", "minilm,smollm2", "--steps", "10", "--final", "1",
                                                 "--threads", "1", "--clock", "cpu", "--name", "compaction_cpu")),
                      # The same with the order reversed every other round (a fixed order's bias, if any).
                      Command("compaction_cpu_alternate", ("--models", "minilm,smollm2", "--steps", "10", "--final",
                                                           "1", "--threads", "1", "--clock", "cpu", "--alternate",
                                                           "--name", "compaction_cpu_alternate"))])
def main(argv: list[str] | None = None) -> int:
    """Measures every model and writes ``results/<name>.json`` / ``.md``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    result = {"machine": machine(), "versions": versions(), "models": [],
              "config": {"steps": args.steps, "warmup": args.warmup, "final": args.final, "threads": args.threads,
                         "init_r": 12, "target_r": 8, "gamma": 0.5, "optimizer": "AdamW lr 1e-4",
                         "load": round(load, 2), "clock": args.clock, "alternate": args.alternate,
                         "timing": "median of round-robin interleaved steps, one process"}}
    for m in args.model_list:  # written after each model, so a long run that is stopped keeps what it measured
        result["models"].append(measure_model(m, args))
        lines = render(result)
        print(write_results(args.name, result, lines))
    print("\n".join(lines))
    return 0
