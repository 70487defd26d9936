"""Experiment 2 (paper Tables 1, 6, 9): instruction tuning SmolLM2 with AdaLoRA vs HyperAdaLoRA.

SmolLM2-135M-Instruct (the packaged checkpoint), all seven linear kinds of its 30 layers
adapted, on the Alpaca subset (metrics: BLEU-4 and ROUGE-1 of greedy generations on held-out
test rows) and on GSM8K (exact match of the final number on the first test problems; BLEU-4 /
ROUGE-1 are not meaningful there). Both methods at one lr (``--lr``, the shipped presets'),
the same seed and data order. Target: AdaLoRA's smoothed training loss at its last step.

CPU scale (one SmolLM2 step of 2 x <=192 tokens takes seconds on one core): ``--steps`` steps
of batch ``--batch-size``; stated in the result. Writes ``results/nlg.*``.

Usage::

    hyperadalora bench nlg --data-dir ../shared/data [--steps 30] [--tasks alpaca,gsm8k]
"""

from __future__ import annotations

import argparse
import statistics

from ..curves import first_reach
from ..registry import Command, experiment
from ..report import fmt, markdown_table, plot_curve_groups
from ..runner import RunSpec, run_specs
from .common import PAPER_HIDDEN, result_path, write_results

PRESETS = {"alpaca": "alpaca_smollm2_adalora", "gsm8k": "gsm8k_smollm2_adalora"}
EVAL = {"alpaca": {"eval_rows": 32, "max_new_tokens": 64}, "gsm8k": {"eval_rows": 16, "max_new_tokens": 192}}
METHOD_ADAPTERS = {  # r, source; AdaLoRA prunes 12 -> 8, the others keep r 8
    "adalora": {"adapter.method": "adalora", "adapter.r": 12},
    "lora": {"adapter.method": "lora", "adapter.r": 8},
    "dora": {"adapter.method": "dora", "adapter.r": 8},
    "dylora": {"adapter.method": "dylora", "adapter.r": 8},
}


def scale_args(p: argparse.ArgumentParser, steps: int) -> None:
    """The CPU-scale options shared by the SmolLM2 experiments."""
    p.add_argument("--data-dir", default=None)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default="runs/bench/smollm2")
    p.add_argument("--eval-rows", type=int, default=None, help="held-out rows to evaluate (default: 32 Alpaca, "
                   "16 GSM8K)")
    p.add_argument("--report-only", action="store_true")


def smollm2_spec(task: str, method: str, hyper: bool, args, eval_overrides: dict | None = None,
                 keep_run_dir: bool = False) -> RunSpec:
    """One SmolLM2 run at the experiment's CPU scale."""
    name = ("hyper" if hyper else "") + method
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "grad_accum": 1, "max_length": args.max_length,
                 "lr": args.lr, "seed": args.seed, "eval_every": 0, "eval_batch_size": 16,
                 "adapter.source": "hyper" if hyper else "direct", "adapter.hyper.hidden": PAPER_HIDDEN,
                 **METHOD_ADAPTERS[method],
                 **EVAL[task], **(eval_overrides or {})}
    if method != "adalora":
        overrides["adapter.allocator"] = None
        overrides["adapter.gamma"] = 0.0
    # The first, default scale keeps its short keys; any other batch size or eval size is in the key.
    scale = f"-n{args.steps}" + (f"-b{args.batch_size}" if args.batch_size != 2 else "")
    if args.eval_rows:
        overrides["eval_rows"] = args.eval_rows
        scale += f"-e{args.eval_rows}"
    return RunSpec(key=f"{task}-smollm2-{name}-lr{args.lr:g}-s{args.seed}{scale}", config=PRESETS[task],
                   overrides=overrides, keep_run_dir=keep_run_dir,
                   tags={"task": task, "model": "smollm2", "method": name, "lr": args.lr, "seed": args.seed})


def summarize(results: dict, specs: list[RunSpec], baseline: str = "adalora") -> tuple[list[dict], dict]:
    """Rows with steps / seconds to the baseline's final smoothed loss, per task; and the targets."""
    rows, targets = [], {}
    for s in specs:
        r = results.get(s.key)
        if r is None:
            continue
        task = s.tags["task"]
        if task not in targets:
            base = next((results.get(b.key) for b in specs if b.tags["task"] == task
                         and b.tags["method"] == baseline), None)
            targets[task] = base["final_smoothed"] if base else None
        steps, secs = (first_reach(r["losses"], r["step_times"], targets[task]) if targets[task] is not None
                       else (None, None))
        rows.append({"task": task, "method": s.tags["method"], "seed": r["seed"], "lr": r["lr"],
                     "target_loss": targets[task], "steps_to_target": steps, "seconds_to_target": secs,
                     "final_smoothed_loss": r["final_smoothed"], "seconds_per_step": statistics.mean(r["step_times"]),
                     "metrics": {k: v for k, v in (r["final_metrics"] or {}).items() if k not in ("step",)},
                     "diverged": r["diverged"]})
    return rows, targets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of :func:`main`."""
    p = argparse.ArgumentParser(prog="hyperadalora bench nlg", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    scale_args(p, steps=30)
    p.add_argument("--tasks", default="alpaca,gsm8k")
    p.add_argument("--name", default="nlg")
    return p.parse_args(argv)


def render(result: dict) -> list[str]:
    """The table of an NLG result: loss, steps / seconds to AdaLoRA's final loss, quality per task and method."""
    c = result["config"]
    table = [[r["task"], r["method"], fmt(r["final_smoothed_loss"]), fmt(r["steps_to_target"], ".0f"),
              fmt(r["seconds_to_target"], ".0f"), f"{r['seconds_per_step']:.2f}",
              fmt(r["metrics"].get("bleu4"), ".2f", "-"), fmt(r["metrics"].get("rouge1"), ".4f", "-"),
              fmt(r["metrics"].get("exact_match"), ".3f", "-"), r["metrics"].get("num_examples", "")]
             for r in result["rows"]]
    return [f"SmolLM2-135M-Instruct, {c['steps']} steps of batch {c['batch_size']} x <= {c['max_length']} tokens, "
            f"lr {c['lr']:g}, seed {c['seed']}; target = AdaLoRA's final smoothed training loss per task.", "",
            *markdown_table(["task", "method", "final loss", "steps to target", "s to target", "s/step", "BLEU-4",
                             "ROUGE-1", "exact match", "eval rows"], table)]


SCALED = ("--steps", "100", "--batch-size", "4")


@experiment("nlg", section="## 2. NLG quality and time (Tables 1, 6, 9): SmolLM2 on Alpaca and GSM8K",
            title="2. SmolLM2 instruction tuning (Alpaca, GSM8K): time to target, BLEU-4 / ROUGE-1",
            parse_args=parse_args, render=render,
            commands=[Command("nlg", ("--workers", "1")),
                      Command("nlg_alpaca_scaled", ("--tasks", "alpaca", *SCALED, "--eval-rows", "64", "--workers", "1",
                                                    "--name", "nlg_alpaca_scaled")),
                      Command("nlg_gsm8k_scaled_lr3e-3", ("--tasks", "gsm8k", *SCALED, "--eval-rows", "32",
                                                          "--lr", "3e-3",
                                                          "--name", "nlg_gsm8k_scaled_lr3e-3"))])
def main(argv: list[str] | None = None) -> int:
    """Runs AdaLoRA and HyperAdaLoRA on each task and writes ``results/<name>.*``."""
    args = parse_args(argv)
    tasks = args.tasks.split(",")
    # GSM8K adapters are kept: the generality experiment shares these two runs and evaluates them on HumanEval.
    specs = [smollm2_spec(t, "adalora", hyper, args, keep_run_dir=(t == "gsm8k")) for t in tasks
             for hyper in (False, True)]
    results = run_specs(specs, args.work_dir, args.data_dir, args.workers, args.threads, only_cached=args.report_only)
    rows, targets = summarize(results, specs)
    config = {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr,
              "seed": args.seed, "eval": EVAL, "eval_rows": args.eval_rows, "presets": PRESETS, "targets": targets,
              "threads_per_run": args.threads, "workers": args.workers}
    curves = {f"{s.tags['task']}/{s.tags['method']}": results[s.key]["losses"] for s in specs if s.key in results}
    result = {"config": config, "rows": rows, "curves": curves}
    lines = render(result)
    write_results(args.name, result, lines)
    panels = {t: {m: [results[s.key]["losses"]] for s in specs if s.key in results and s.tags["task"] == t
                  for m in [s.tags["method"]]} for t in tasks}
    plot_curve_groups({}, result_path(args.name), "SmolLM2: AdaLoRA vs HyperAdaLoRA (smoothed training loss)",
                      target=targets, panels=panels)
    print("\n".join(lines))
    return 0
