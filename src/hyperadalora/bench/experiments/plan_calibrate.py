"""Checks the memory planner (``hyperadalora plan``) against measured training steps.

Each variant ``MODEL:METHOD:SOURCE[:ckpt]`` trains all linears of a packaged model (fp32, AdamW,
a classification head for MiniLM / MPNet, the LM loss for SmolLM2, random tokens) for a few
steps in a fresh process; its peak resident-set growth over those steps is measured with
:func:`.step_model.measure_memory` (the same subprocess, peak-RSS reset and glibc mmap threshold
as ``step_cost``). Before the measurement each variant runs one forward + backward on a 1 x 32
batch, so that the runtime's one-time buffers (about 530 MiB for SmolLM2, whatever the batch) are
not counted. That growth is what the steps create: gradients, optimizer and allocator state,
generated factors, activations and the backward's transient buffers, so the planner's
``step_memory`` (the same terms) is compared with it. RSS also counts allocator overhead and a few
small buffers the planner leaves out. MPNet has no activation checkpointing in transformers.

Usage::

    hyperadalora bench plan_calibrate                  # the default variants (about 25 minutes, 1 thread)
    hyperadalora bench plan_calibrate --variants minilm:lora:direct,smollm2:lora:direct:ckpt
    hyperadalora bench plan_calibrate --repredict      # the planner changed: new predictions, same measurements
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..paths import results_dir
from ..experiment import Command, experiment
from .common import write_results
from .step_model import make_batch, measure_memory  # noqa: F401  (make_batch: read by the measuring subprocess)

BATCH = {"minilm": (16, 128), "mpnet": (8, 128), "smollm2": (4, 256)}
TOTAL_STEP = 100_000
VARIANTS = ("minilm:lora:direct", "minilm:adalora:direct", "minilm:adalora:hyper", "minilm:lora:direct:ckpt",
            "mpnet:lora:direct", "mpnet:adalora:hyper",
            "smollm2:lora:direct", "smollm2:adalora:hyper", "smollm2:lora:direct:ckpt")
WARMUP_BATCH = (1, 32)
SECTION = "## Planning memory and FLOPs at 1B-70B (`hyperadalora plan`, issue 19 item 6)"


def parse(variant: str) -> tuple[str, str, str, bool]:
    """``"smollm2:lora:direct:ckpt"`` -> ``("smollm2", "lora", "direct", True)``."""
    parts = variant.split(":")
    if len(parts) not in (3, 4) or parts[0] not in BATCH or (len(parts) == 4 and parts[3] != "ckpt"):
        raise ValueError(f"variant {variant!r} must be MODEL:METHOD:SOURCE[:ckpt] with MODEL in {list(BATCH)}")
    return parts[0], parts[1], parts[2], len(parts) == 4


def adapter_config(model: str, method: str, source: str):
    """All linears at r = 8 (AdaLoRA 12 -> 8), the task head trained for the classifiers."""
    import hyperadalora as ha

    kw = dict(r=8)
    if method == "adalora":
        kw = dict(r=12, allocator=ha.AllocatorConfig(total_step=TOTAL_STEP, target_r=8, deltaT=1))
    heads = () if model == "smollm2" else ("classifier",)
    return ha.AdapterConfig(method=method, source=source, lora_alpha=16, modules_to_save=heads, seed=0, **kw)


def load_base():
    """Nothing shared: each variant loads its own model in :func:`build`."""
    return None


def build(variant: str, base=None, hyper_base: dict | None = None):
    """The wrapped model's step function (``step_model.build``'s contract), after a warm-up pass."""
    import hyperadalora as ha
    from hyperadalora.models import load_model

    model_name, method, source, ckpt = parse(variant)
    causal = model_name == "smollm2"
    hf, _ = load_model(model_name, task="causal-lm" if causal else "sequence-classification")
    if ckpt:
        hf.activation_checkpointing_enable()
    model = ha.wrap(hf, adapter_config(model_name, method, source))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    counter = [0]

    def step(batch, accumulate: int = 1):
        if causal:
            batch = {**batch, "labels": batch["input_ids"]}
        loss = model(**batch).loss  # the output (and its logits) is dropped before the backward, as in a loop
        loss.backward()
        opt.step()
        model.after_step(counter[0])
        opt.zero_grad(set_to_none=True)
        counter[0] += 1

    # One forward + backward on a tiny batch: the runtime's one-time buffers are then in the
    # baseline, not in the growth. No optimizer step: its state is a planned term.
    warm = make_batch(*WARMUP_BATCH)
    if causal:
        warm["labels"] = warm["input_ids"]
    model(**warm).loss.backward()
    model.after_step(0)  # ends the step for the factor source (a hyper source drops its generated factors)
    opt.zero_grad(set_to_none=True)
    counter[0] = 1
    return step, sum(p.numel() for p in params), None


def predict(variant: str) -> float:
    """The planner's step memory (MiB) for the variant."""
    from hyperadalora.plan import TrainSetup, make_plan, resolve_shape

    model_name, method, source, ckpt = parse(variant)
    batch, seq = BATCH[model_name]
    setup = TrainSetup(batch=batch, seq_len=seq, precision="fp32", checkpointing=ckpt, overhead_gib=0.0)
    return make_plan(resolve_shape(model_name), adapter_config(model_name, method, source), setup).step_memory / 2**20


def measure_rows(variants: list[str], threads: int, memory_steps: int) -> list[dict]:
    """Measured step memory, one fresh process per variant, one at a time."""
    rows = []
    for variant in variants:
        batch, seq = BATCH[parse(variant)[0]]
        margs = argparse.Namespace(threads=threads, batch_size=batch, accumulate=1, memory_batch_size=None,
                                   seq_len=seq, memory_steps=memory_steps)
        rows.append({"variant": variant, "batch": batch, "seq_len": seq,
                     "measured_mib": measure_memory(variant, margs, module="plan_calibrate")})
        print(f"{variant}: measured {rows[-1]['measured_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return rows


def render(result: dict) -> list[str]:
    """The calibration table of a result."""
    c, rows = result["config"], result["rows"]
    table = ["Planner (`hyperadalora plan`, step memory) vs measured peak RSS growth over "
             f"{c['memory_steps']} fp32 training steps (hyperadalora bench plan_calibrate, {c['threads']} thread).", "",
             "| variant | batch x seq | measured MiB | predicted MiB | error |", "|---|---|---|---|---|"]
    table += [f"| {r['variant']} | {r['batch']} x {r['seq_len']} | {r['measured_mib']:.0f} | "
              f"{r['predicted_mib']:.0f} | {100 * r['error']:+.1f}% |" for r in rows]
    return table + ["", f"Largest error: {100 * max(abs(r['error']) for r in rows):.1f}%."]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of :func:`main`."""
    p = argparse.ArgumentParser(prog="hyperadalora bench plan_calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--name", default="plan_calibration")
    p.add_argument("--repredict", action="store_true",
                   help="keep the measurements of results/<name>.json and recompute only the predictions")
    return p.parse_args(argv)


@experiment("plan_calibrate", section=SECTION, title="the memory planner against measured MiniLM / MPNet / SmolLM2 "
            "steps", parse_args=parse_args, render=render, data=False,
            commands=[Command("plan_calibration", ("--threads", "1"))])
def main(argv: list[str] | None = None) -> int:
    """Measures (or, with ``--repredict``, reuses) and predicts; writes ``results/<name>.json`` / ``.md``."""
    args = parse_args(argv)
    if args.repredict:
        old = json.loads((results_dir() / f"{args.name}.json").read_text())
        rows, args.threads, args.memory_steps = old["rows"], old["config"]["threads"], old["config"]["memory_steps"]
    else:
        rows = measure_rows([v for v in args.variants.split(",") if v], args.threads, args.memory_steps)
    for r in rows:
        r["predicted_mib"] = predict(r["variant"])
        r["error"] = r["predicted_mib"] / r["measured_mib"] - 1
    result = {"config": {"memory_steps": args.memory_steps, "threads": args.threads, "precision": "fp32",
                         "optimizer": "AdamW"}, "rows": rows}
    table = render(result)
    print(write_results(args.name, result, table))
    print("\n".join(table))
    return 0
