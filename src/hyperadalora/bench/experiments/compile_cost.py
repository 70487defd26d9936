"""``torch.compile`` of a wrapped MiniLM against eager (issue 23, item 5): step time and graph breaks.

Per variant (our LoRA, AdaLoRA and HyperAdaLoRA; r 8, alpha 16, MiniLM's 36 encoder linears, the
classifier trained, AdamW lr 1e-4, batch 16 x 128 random tokens, dropout off so that the two
runs' losses are comparable), two models from the same base in
one process: eager, and compiled in place (``model.model.compile()``, what ``compile=true`` does;
CPU inductor here). Each takes ``--warmup`` untimed steps (the compiled one compiles there; the
seconds are recorded), then ``--steps`` timed steps, the two taking turns step by step, timed by the
process's CPU time (``--threads 1``: the work done, not the waiting on a shared machine). The loss of
every step is kept, so the compiled run's agreement with eager is measured on the real model too.
``torch._dynamo.explain`` of a fresh model's forward (the inner model, after the hyper source has
generated its factors, as ``AdaptedModel.forward`` does) counts its graphs and graph breaks, with
the reasons.

Usage::

    hyperadalora bench compile_cost [--variants lora,adalora,hyperadalora] [--steps 10] [--warmup 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from .. import scale
from ..experiment import Command, experiment
from ..report import machine, markdown_table, versions
from .common import MINILM_ENCODER_LINEARS, comma_choices, write_results
from .compaction import make_batch

VARIANTS = {"lora": ("lora", "direct"), "adalora": ("adalora", "direct"), "hyperadalora": ("adalora", "hyper")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of :func:`main`."""
    p = argparse.ArgumentParser(prog="hyperadalora bench compile_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=10, help="timed steps of each model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the compiled model compiles there)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="compile_cost")
    args = p.parse_args(argv)
    args.variant_list = comma_choices(p, args.variants, VARIANTS, "variants")
    if args.steps < 1 or args.warmup < 2:
        p.error("--steps >= 1 and --warmup >= 2 (the second step recompiles once: transformers sets "
                "config.problem_type on the first classification forward)")
    return args


def wrap(base: torch.nn.Module, variant: str):
    """Our ``variant`` over a copy of ``base``."""
    import hyperadalora as ha

    method, source = VARIANTS[variant]
    alloc = ha.AllocatorConfig(total_step=1000, target_r=4, tinit=0, tfinal=0, deltaT=1) if method == "adalora" else None
    cfg = ha.AdapterConfig(method=method, source=source, r=8, lora_alpha=16, seed=0,
                           target_modules=MINILM_ENCODER_LINEARS, modules_to_save=("classifier",), allocator=alloc)
    return ha.wrap(copy.deepcopy(base), cfg).train()


def graph_breaks(base: torch.nn.Module, variant: str, batch: dict) -> dict:
    """``torch._dynamo.explain`` of a fresh ``variant``'s training forward."""
    torch._dynamo.reset()
    model = wrap(base, variant)
    # As AdaptedModel.forward does before the (compiled) inner model runs: the hyper source
    # generates its factors there, outside the compiled region.
    model.source.prepare_training_forward()
    explanation = torch._dynamo.explain(model.model)(**batch)
    return {"graphs": explanation.graph_count, "breaks": explanation.graph_break_count,
            "reasons": sorted({str(b.reason) for b in explanation.break_reasons})}


def measure(base: torch.nn.Module, variant: str, batch: dict, args) -> dict:
    """Eager against compiled for one variant, interleaved; their losses and CPU seconds."""
    torch._dynamo.reset()
    models = {"eager": wrap(base, variant), "compiled": wrap(base, variant)}
    models["compiled"].model.compile()
    steps = {k: scale.make_trainer(m, scale.SETTINGS["fp32"]) for k, m in models.items()}
    losses = {k: [] for k in models}
    times = {k: [] for k in models}
    warm = {}
    for k, step in steps.items():
        t0 = time.process_time()
        losses[k] += [step(batch) for _ in range(args.warmup)]
        warm[k] = time.process_time() - t0
    for i in range(args.steps):
        for k in (("eager", "compiled") if i % 2 == 0 else ("compiled", "eager")):
            t0 = time.process_time()
            losses[k].append(steps[k](batch))
            times[k].append(time.process_time() - t0)
        print(f"{variant} step {i + 1}/{args.steps}: eager {times['eager'][-1]:.2f}s compiled "
              f"{times['compiled'][-1]:.2f}s", flush=True)
    med = {k: statistics.median(t) for k, t in times.items()}
    return {"variant": variant, "losses": losses, "cpu_s": times, "warmup_cpu_s": warm, "median_cpu_s": med,
            "ratio": med["compiled"] / med["eager"],
            "max_loss_diff": max(abs(a - b) for a, b in zip(losses["compiled"], losses["eager"])),
            "explain": graph_breaks(base, variant, batch)}


def render(result: dict) -> list[str]:
    """The table of a compile_cost result."""
    c = result["config"]
    head = (f"minilm, batch {c['batch']} x {c['seq']}, r 8, {c['threads']} thread(s) ({result['machine']['device']}); "
            f"median process CPU time of {c['steps']} interleaved steps after {c['warmup']} untimed ones; "
            f"load average {c['load']} at the start.")
    rows = []
    for r in result["variants"]:
        e = r["explain"]
        rows.append([r["variant"], f"{r['median_cpu_s']['eager']:.3f}", f"{r['median_cpu_s']['compiled']:.3f}",
                     f"{r['ratio']:.3f}", f"{r['warmup_cpu_s']['compiled'] - r['warmup_cpu_s']['eager']:.0f}",
                     f"{r['max_loss_diff']:.2e}", str(e["graphs"]), str(e["breaks"]), "; ".join(e["reasons"]) or "-"])
    return [head, "", *markdown_table(["variant", "eager CPU s/step", "compiled CPU s/step", "compiled / eager",
                                       "compile CPU s (warm-up extra)", "max abs loss diff", "graphs", "graph breaks",
                                       "break reasons"], rows)]


@experiment("compile_cost", section="### torch.compile on MiniLM: speed and graph breaks (issue 23, item 5)",
            title="compiled against eager training steps of a wrapped MiniLM, interleaved; graph breaks",
            parse_args=parse_args, render=render, data=False,
            commands=[Command("compile_cost", ("--variants", "lora,adalora,hyperadalora", "--steps", "10"))])
def main(argv: list[str] | None = None) -> int:
    """Measures every variant and writes ``results/<name>.json`` / ``.md`` after each."""
    from ...models import load_model

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"machine": machine(), "versions": versions(), "variants": [],
              "config": {"steps": args.steps, "warmup": args.warmup, "batch": args.batch, "seq": args.seq,
                         "threads": args.threads, "load": round(os.getloadavg()[0], 2),
                         "timing": "process CPU time, eager and compiled alternating step by step"}}
    base, _ = load_model("minilm", task="sequence-classification", num_labels=2)
    for module in base.modules():  # no dropout: eager and compiled draw their masks differently
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = make_batch("sequence-classification", args.batch, args.seq)
    for variant in args.variant_list:
        result["variants"].append(measure(base, variant, batch, args))
        lines = render(result)
        print(write_results(args.name, result, lines))
    print("\n".join(lines))
    return 0
