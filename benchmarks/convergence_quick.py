"""First convergence check: AdaLoRA vs HyperAdaLoRA (per token layout) on MiniLM / SST-2.

Same seed, same data order, ``--steps`` optimizer steps at batch 16; every variant at every
learning rate of ``--lrs``. For each variant: its best learning rate (lowest final smoothed
training loss), the step at which it first reaches the smoothed training loss that AdaLoRA
(at AdaLoRA's best learning rate) has at the last step, the wall time to that step, and dev
accuracy on the real SST-2 dev rows.

Usage::

    python benchmarks/convergence_quick.py --data-dir ../shared/data [--steps 300] \
        [--variants rank:anchored,rank:reparam,rank:recurrent,patch] [--lrs 1e-5,1e-4,3e-4,1e-3,3e-3] \
        [--dev-rows 872] [--resume]

A variant is ``layout[:mode]`` (mode: recurrent, reparam, anchored; default: HyperConfig's).
``--resume`` keeps the runs already in the output JSON and runs only the missing ones.

Writes ``benchmarks/results/convergence_quick.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

import hyperadalora as ha
from common import PAPER_HIDDEN  # benchmarks/ is on sys.path when a script runs
from hyperadalora.data.glue import read_glue, resolve_data_dir
from hyperadalora.models import load_model
from hyperadalora.train.plots import smooth  # bias-corrected EMA, as the run plots and the demo

RESULTS = Path(__file__).resolve().parent / "results"
ENCODER = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"


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


def run_variant(base, tokenizer, batches, dev_rows, variant, lr, args):
    hyper = variant is not None
    layout, _, mode = (variant or "").partition(":")
    # The paper's TinyBERT-sized hypernetworks (the default when this check was made).
    hyper_kw = {"tokens": layout or "rank", "hidden": PAPER_HIDDEN} | ({"mode": mode} if mode else {})
    cfg = ha.AdapterConfig(
        method="adalora", r=12, lora_alpha=16, target_modules=ENCODER, modules_to_save=("classifier",),
        gamma=0.1, seed=args.seed, source="hyper" if hyper else "direct",
        hyper=ha.HyperConfig(**hyper_kw),
        allocator=ha.AllocatorConfig(total_step=args.steps, target_r=8, tinit=args.steps // 10,
                                     tfinal=args.steps // 5, deltaT=10),
    )
    torch.manual_seed(args.seed)
    model = ha.wrap(copy.deepcopy(base), cfg)
    opt = torch.optim.AdamW(model.optimizer_param_groups(lr))
    model.train()
    losses, times = [], []
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        out = model(**batch)
        loss = out.loss
        if not torch.isfinite(loss):
            print(f"  diverged at step {step}", file=sys.stderr)
            break
        loss.backward()
        opt.step()
        model.after_step(step)
        opt.zero_grad()
        losses.append(model.last_task_loss)
        times.append(time.perf_counter() - start)
    acc = dev_accuracy(model, tokenizer, dev_rows, args.max_length) if len(losses) == len(batches) else None
    return {"layout": variant or "direct", "lr": lr, "task_losses": losses, "elapsed": times,
            "dev_accuracy": acc, "final_smoothed": smooth(losses)[-1] if losses else math.inf,
            "diverged": len(losses) < len(batches),
            "seconds_per_step": times[-1] / len(times) if times else None}


def first_reach(run, target):
    for step, (s, t) in enumerate(zip(smooth(run["task_losses"]), run["elapsed"])):
        if s <= target:
            return step + 1, t
    return None, None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--out", default=str(RESULTS / "convergence_quick"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = resolve_data_dir(args.data_dir)
    base, tokenizer = load_model("minilm", num_labels=2)
    batches = make_batches(read_glue("sst2", "train", data), tokenizer, args.steps, args.batch_size,
                           args.max_length, args.seed)
    dev_rows = read_glue("sst2", "dev", data)[: args.dev_rows]
    lrs = [float(x) for x in args.lrs.split(",")]
    variants = ([] if args.no_direct else [None]) + [x for x in args.variants.split(",") if x]
    runs = []
    out_json = Path(args.out).with_suffix(".json")
    if args.resume and out_json.exists():
        runs = json.loads(out_json.read_text())["curves"]
    # Learning-rate-major order: a partial run (stopped early) already holds every variant's likely-best lrs.
    for lr, layout in [(lr, v) for lr in lrs for v in variants]:
        if any(r["layout"] == (layout or "direct") and r["lr"] == lr for r in runs):
            continue
        print(f"{layout or 'direct'} lr={lr:g} ...", file=sys.stderr, flush=True)
        r = run_variant(base, tokenizer, batches, dev_rows, layout, lr, args)
        print(f"  final smoothed loss {r['final_smoothed']:.4f}  dev acc {r['dev_accuracy']}  "
              f"{r['seconds_per_step']:.3f} s/step", file=sys.stderr, flush=True)
        runs.append(r)
        write_summary(runs, args, len(dev_rows))  # after every run: nothing lost if stopped
    print("\n".join(write_summary(runs, args, len(dev_rows))))


def write_summary(runs, args, n_dev):
    """Writes the JSON and markdown summaries of the runs so far; returns the table lines."""
    best = {}
    for r in runs:
        if r.get("diverged"):
            continue
        if r["layout"] not in best or r["final_smoothed"] < best[r["layout"]]["final_smoothed"]:
            best[r["layout"]] = r
    target = best["direct"]["final_smoothed"]
    rows = []
    for r in runs:
        steps, secs = first_reach(r, target)
        name = "adalora" if r["layout"] == "direct" else "hyper_adalora_" + r["layout"].replace(":", "_")
        rows.append({"variant": name,
                     "layout": r["layout"], "lr": r["lr"], "best_lr": best.get(r["layout"]) is r,
                     "final_smoothed_loss": r["final_smoothed"], "steps_to_target": steps,
                     "seconds_to_target": secs, "seconds_per_step": r["seconds_per_step"],
                     "dev_accuracy": r["dev_accuracy"], "diverged": bool(r.get("diverged"))})
    result = {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
              "versions": {"torch": torch.__version__, "hyperadalora": ha.__version__},
              "config": {**vars(args), "model": "minilm", "task": "sst2", "target_loss": target,
                         "target_definition": "smoothed (EMA 0.9) training task loss of AdaLoRA at its best lr, "
                                              "last step"},
              "rows": rows, "curves": runs}
    result["config"]["note"] = "a diverged run (non-finite loss) is never a best lr; its row says so"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"Target loss {target:.4f} (AdaLoRA, best lr, smoothed, step {args.steps}); MiniLM, SST-2, "
             f"batch {args.batch_size} x <= {args.max_length} tokens, {n_dev} dev rows.", "",
             "| variant | lr | best lr | final smoothed loss | steps to target | s to target | s/step | dev acc |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        fmt = lambda v, f: "never" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {row['variant']} | {row['lr']:g} | {'yes' if row['best_lr'] else ''} | "
                     f"{row['final_smoothed_loss']:.4f}{' (diverged)' if row['diverged'] else ''} | {fmt(row['steps_to_target'], 'd')} | "
                     f"{fmt(row['seconds_to_target'], '.1f')} | {row['seconds_per_step']:.3f} | "
                     f"{fmt(row['dev_accuracy'], '.3f')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
