"""First convergence check: AdaLoRA vs HyperAdaLoRA (per token layout) on MiniLM / SST-2.

Same seed, same data order, ``--steps`` optimizer steps at batch 16; every variant at every
learning rate of ``--lrs``. For each variant: its best learning rate (lowest final smoothed
training loss), the step at which it first reaches the smoothed training loss that AdaLoRA
(at AdaLoRA's best learning rate) has at the last step, the wall time to that step, and dev
accuracy on the real SST-2 dev rows.

Usage::

    hyperadalora bench convergence_quick --data-dir ../shared/data [--steps 300] \
        [--variants rank:anchored,rank:reparam,rank:recurrent,patch] [--lrs 1e-5,1e-4,3e-4,1e-3,3e-3] \
        [--dev-rows 872] [--resume]

A variant is ``layout[:mode]`` (mode: recurrent, reparam, anchored; default: HyperConfig's).
``--resume`` keeps the runs already in the output JSON (and its ``notes``: lines added under the
table by hand) and runs only the missing ones. Every step is the library's
(:func:`~hyperadalora.train.step.optimizer_step`, no clipping, constant lr); the adapter config is
built by the run config's override parser.

Writes ``results/convergence_quick.json`` and ``.md``.
"""


from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time

import torch

from ...train.presets import load_run_config
from ...train.plots import smooth
from ...train.step import optimizer_step
from ..curves import first_reach
from ..registry import Command, experiment
from ..report import fmt, markdown_table
from .common import MINILM_ENCODER_LINEARS, PAPER_HIDDEN, result_path, write_results

# The paper's TinyBERT-sized hypernetworks (the default when this check was made).
BASE = {"adapter": {"method": "adalora", "r": 12, "lora_alpha": 16, "target_modules": MINILM_ENCODER_LINEARS,
                    "modules_to_save": ["classifier"], "gamma": 0.1, "hyper": {"hidden": PAPER_HIDDEN},
                    "allocator": {"target_r": 8, "deltaT": 10}}}


def make_batches(rows, tokenizer, steps, batch_size, max_length, seed):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    batches = []
    for step in range(steps):
        chunk = [rows[order[(step * batch_size + i) % len(order)]] for i in range(batch_size)]
        b = tokenizer([r.text_a for r in chunk], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
        b["labels"] = torch.tensor([r.label for r in chunk])
        batches.append(b)
    return batches


@torch.no_grad()
def dev_accuracy(model, tokenizer, rows, max_length):
    model.eval()
    correct = 0
    for i in range(0, len(rows), 64):
        chunk = rows[i:i + 64]
        b = tokenizer([r.text_a for r in chunk], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
        pred = model(**b).logits.argmax(-1)
        correct += int((pred == torch.tensor([r.label for r in chunk])).sum())
    model.train()
    return correct / len(rows)


def adapter_overrides(variant: str | None, args: argparse.Namespace) -> list[str]:
    """The run-config overrides of a variant: ``None`` is AdaLoRA, ``layout[:mode]`` a hyper source."""
    overrides = [f"steps={args.steps}", f"adapter.seed={args.seed}",
                 f"adapter.source={'hyper' if variant else 'direct'}"]
    if variant:
        layout, _, mode = variant.partition(":")
        overrides += [f"adapter.hyper.tokens={layout or 'rank'}"] + ([f"adapter.hyper.mode={mode}"] if mode else [])
    return overrides


def run_variant(base, tokenizer, batches, dev_rows, variant: str | None, lr: float, args: argparse.Namespace) -> dict:
    """Trains one variant at one lr over ``batches`` (one optimizer step each); its curve and dev accuracy."""
    import hyperadalora as ha

    cfg = load_run_config(BASE, adapter_overrides(variant, args)).adapter
    torch.manual_seed(args.seed)
    model = ha.wrap(copy.deepcopy(base), cfg)
    opt = torch.optim.AdamW(model.optimizer_param_groups(lr))
    model.train()
    losses, times = [], []
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        stats = optimizer_step(model, opt, [batch], step_index=step, max_grad_norm=0.0)
        if not stats.finite:
            print(f"  diverged: {stats.problem}", file=sys.stderr)
            break
        losses.append(stats.task_loss)
        times.append(time.perf_counter() - start)
    acc = dev_accuracy(model, tokenizer, dev_rows, args.max_length) if len(losses) == len(batches) else None
    return {"layout": variant or "direct", "lr": lr, "task_losses": losses, "elapsed": times,
            "dev_accuracy": acc, "final_smoothed": smooth(losses)[-1] if losses else math.inf,
            "diverged": len(losses) < len(batches),
            "seconds_per_step": times[-1] / len(times) if times else None}


def reach(run: dict, target: float) -> tuple[int | None, float | None]:
    """Steps and seconds until the run's smoothed loss first reaches ``target`` (``elapsed`` is cumulative)."""
    elapsed = run["elapsed"]
    return first_reach(run["task_losses"], [b - a for a, b in zip([0.0, *elapsed], elapsed)], target)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of :func:`main`."""
    p = argparse.ArgumentParser(prog="hyperadalora bench convergence_quick", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--variants", default="rank:anchored,rank:reparam,rank:recurrent,patch:anchored",
                   help="hyper variants layout[:mode] to run (comma-separated)")
    p.add_argument("--no-direct", action="store_true", help="skip the AdaLoRA baseline runs (with --resume)")
    p.add_argument("--resume", action="store_true", help="keep the runs already in the output JSON")
    p.add_argument("--lrs", default="3e-3,1e-3,1e-5,3e-4,1e-4", help="in the order they run")
    p.add_argument("--dev-rows", type=int, default=872)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 avoids spin-waiting on a busy machine)")
    p.add_argument("--skip", default="", help="cells not to run, as variant@lr pairs (e.g. rank:reparam@1e-4; "
                   "the baseline is direct)")
    p.add_argument("--name", default="convergence_quick")
    args = p.parse_args(argv)
    try:
        args.skip_cells = {(v, float(lr)) for v, _, lr in (x.partition("@") for x in args.skip.split(",") if x)}
    except ValueError:
        p.error(f"--skip {args.skip!r}: give variant@lr pairs such as rank:reparam@1e-4")
    return args


def render(result: dict) -> list[str]:
    """The table of the check (and the hand-written ``notes`` kept in the result)."""
    c = result["config"]
    table = [[row["variant"], f"{row['lr']:g}", "yes" if row["best_lr"] else "",
              f"{row['final_smoothed_loss']:.4f}" + (" (diverged)" if row["diverged"] else ""),
              fmt(row["steps_to_target"], "d"), fmt(row["seconds_to_target"], ".1f"), f"{row['seconds_per_step']:.3f}",
              fmt(row["dev_accuracy"], ".3f")] for row in result["rows"]]
    return [f"Target loss {c['target_loss']:.4f} (AdaLoRA, best lr, smoothed, step {c['steps']}); MiniLM, SST-2, "
            f"batch {c['batch_size']} x <= {c['max_length']} tokens, {c.get('dev_rows_used', c['dev_rows'])} dev rows.",
            "", *markdown_table(["variant", "lr", "best lr", "final smoothed loss", "steps to target", "s to target",
                                 "s/step", "dev acc"], table), *result.get("notes", [])]


@experiment("convergence_quick", section="## 8. Beyond the paper: layouts, modes, allocation",
            title="8. the first one-seed layout / mode check (constant lr, 300 steps)", parse_args=parse_args,
            render=render,
            commands=[Command("convergence_quick",
                              ("--variants", "rank:anchored,rank:reparam,rank:recurrent,patch:reparam",
                               "--skip", "rank:reparam@1e-4,rank:recurrent@1e-4,patch:reparam@1e-4"))])
def main(argv: list[str] | None = None) -> int:
    """Runs every variant at every lr (learning-rate major) and writes ``results/<name>.*`` after each run."""
    from ...data.glue import read_glue, resolve_data_dir
    from ...models import load_model

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = resolve_data_dir(args.data_dir)
    base, tokenizer = load_model("minilm", num_labels=2)
    batches = make_batches(read_glue("sst2", "train", data), tokenizer, args.steps, args.batch_size,
                           args.max_length, args.seed)
    dev_rows = read_glue("sst2", "dev", data)[: args.dev_rows]
    lrs = [float(x) for x in args.lrs.split(",")]
    variants = ([] if args.no_direct else [None]) + [x for x in args.variants.split(",") if x]
    saved = result_path(args.name, ".json")
    previous = json.loads(saved.read_text()) if args.resume and saved.is_file() else {}
    runs, notes = previous.get("curves", []), previous.get("notes", [])
    # Learning-rate-major order: a partial run (stopped early) already holds every variant's likely-best lrs.
    for lr, layout in [(lr, v) for lr in lrs for v in variants]:
        if ((layout or "direct", lr) in args.skip_cells
                or any(r["layout"] == (layout or "direct") and r["lr"] == lr for r in runs)):
            continue
        print(f"{layout or 'direct'} lr={lr:g} ...", file=sys.stderr, flush=True)
        r = run_variant(base, tokenizer, batches, dev_rows, layout, lr, args)
        print(f"  final smoothed loss {r['final_smoothed']:.4f}  dev acc {r['dev_accuracy']}  "
              f"{r['seconds_per_step']:.3f} s/step", file=sys.stderr, flush=True)
        runs.append(r)
        write_summary(runs, args, len(dev_rows), notes)  # after every run: nothing lost if stopped
    print("\n".join(write_summary(runs, args, len(dev_rows), notes)))
    return 0


def write_summary(runs: list[dict], args: argparse.Namespace, n_dev: int, notes: list[str]) -> list[str]:
    """Writes the JSON and markdown summaries of the runs so far; returns the markdown lines."""
    best = {}
    for r in runs:
        if r.get("diverged"):
            continue
        if r["layout"] not in best or r["final_smoothed"] < best[r["layout"]]["final_smoothed"]:
            best[r["layout"]] = r
    target = best["direct"]["final_smoothed"]
    rows = []
    for r in runs:
        steps, secs = reach(r, target)
        name = "adalora" if r["layout"] == "direct" else "hyper_adalora_" + r["layout"].replace(":", "_")
        rows.append({"variant": name,
                     "layout": r["layout"], "lr": r["lr"], "best_lr": best.get(r["layout"]) is r,
                     "final_smoothed_loss": r["final_smoothed"], "steps_to_target": steps,
                     "seconds_to_target": secs, "seconds_per_step": r["seconds_per_step"],
                     "dev_accuracy": r["dev_accuracy"], "diverged": bool(r.get("diverged"))})
    options = {k: v for k, v in vars(args).items() if k != "skip_cells"}
    result = {"config": {**options, "model": "minilm", "task": "sst2", "target_loss": target, "dev_rows_used": n_dev,
                         "target_definition": "smoothed (EMA 0.9) training task loss of AdaLoRA at its best lr, "
                                              "last step",
                         "note": "a diverged run (non-finite loss) is never a best lr; its row says so"},
              "rows": rows, "curves": runs, "notes": notes}
    lines = render(result)
    write_results(args.name, result, lines)
    return lines
