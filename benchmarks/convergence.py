"""Experiment 1 (paper Fig. 2): convergence of AdaLoRA vs HyperAdaLoRA on GLUE, MiniLM and MPNet.

Every run is the real training loop (``hyperadalora.train.loop.train``: AdamW, 6% warm-up, cosine
decay, clipping at 1.0, AdaLoRA r 12 -> 8 over the 36 / 48 encoder linears, gamma 0.1), the
same seed giving both methods the same data order and the same initial factors.

Protocol (CPU scale; the reasons are in BENCHMARKS.md):

1. Learning-rate sweep on MiniLM, seed 0: every lr of ``--lrs`` for both methods on every task.
   A method's *best lr* is the one with the lowest smoothed training loss at the last step
   (chosen on the training loss, never on dev).
2. Seeds: both methods at their own best lr with ``--seeds`` seeds; at the paper's lr (1e-5)
   with ``--paper-seeds`` seeds (seed 0 of both comes from the sweep); on MPNet with
   ``--mpnet-paper-seeds`` seeds.
3. MPNet: ``--mpnet-seeds`` seeds on ``--mpnet-tasks``, at the MiniLM best lr of each method and
   task (one MPNet step costs about four MiniLM steps) or, for the tasks ``--mpnet-sweep`` names,
   at the MPNet best lr among seed-0 runs at the MiniLM best lr and the lrs it lists.

Target loss of a (task, model, lr setting): the smoothed loss (EMA 0.9) AdaLoRA reaches at its
last step, averaged over its seeds. Each run's steps / seconds to target are the first step at
which its smoothed loss is at or below that. Writes ``results/convergence.json`` (``rows``:
one per task, model, method, lr setting, seed; ``sweep``; the loss curves), ``.md`` and
``convergence.png``. Runs are cached in ``--work-dir``: a stopped run resumes.

Usage::

    python benchmarks/convergence.py --data-dir ../shared/data [--workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

from common import PAPER_HIDDEN, RESULTS  # benchmarks/ is on sys.path when a script runs
from hyperadalora.bench.curves import best_lr, first_reach, mean_or_none
from hyperadalora.bench.report import fmt, markdown_table, plot_curve_groups, write_result
from hyperadalora.bench.runner import RunSpec, run_specs

PAPER_LR = 1e-5
LRS = (1e-5, 1e-4, 3e-4, 1e-3, 3e-3)
METHODS = {"adalora": "direct", "hyperadalora": "hyper"}
MODEL_NAMES = {"minilm": "MiniLM", "mpnet": "MPNet"}
MODELS = {
    "minilm": {"adapter.target_modules": r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)"
                                         r"|attention\.output\.dense|intermediate\.dense|output\.dense)",
               "adapter.lora_alpha": 16},
    "mpnet": {"adapter.target_modules": r".*encoder\.layer\.\d+\.(attention\.attn\.(q|k|v|o)|intermediate\.dense"
                                        r"|output\.dense)",
              "adapter.lora_alpha": 32},
}
# steps x batch 16: SST-2 learns within a few hundred steps; RTE (first 512 rows) and WNLI (all 635)
# get three epochs, since in one their loss barely moves.
TASKS = {
    "sst2": {"steps": 200, "max_length": 64},
    "rte": {"steps": 96, "max_length": 128, "train_rows": 512},
    "wnli": {"steps": 120, "max_length": 128},
}
QUICK_TASKS = {"sst2": {"steps": 100, "max_length": 64, "eval_rows": 256}}
BASE = {
    "batch_size": 16, "warmup_ratio": 0.06, "max_grad_norm": 1.0, "eval_every": 0, "eval_batch_size": 64,
    "adapter": {"method": "adalora", "r": 12, "gamma": 0.1, "modules_to_save": ["classifier"],
                "allocator": {"target_r": 8, "deltaT": 10},
                # The paper's hypernetwork (TinyBERT-sized body), not the library's lighter default.
                "hyper": {"hidden": PAPER_HIDDEN}},
}


def spec(task: str, model: str, method: str, lr: float, seed: int, tasks: dict, extra: dict | None = None,
         tag: str = "") -> RunSpec:
    """One run of the protocol (``extra``: more overrides, e.g. the hypernetwork body)."""
    overrides = {"task": task, "model": model, "lr": lr, "seed": seed, "adapter.source": METHODS[method],
                 **MODELS[model], **tasks[task], **(extra or {})}
    key = f"{task}-{model}-{method}{tag}-lr{lr:g}-s{seed}"
    # SST-2 / MiniLM / seed 0 adapters are kept for the similarity experiment (benchmarks/similarity.py).
    return RunSpec(key=key, config=BASE, overrides=overrides, keep_run_dir=(task, model, seed) == ("sst2", "minilm", 0),
                   tags={"task": task, "model": model, "method": method, "lr": lr, "seed": seed})


def parse_mpnet_seeds(text: str, mpnet_tasks: list[str], parser: argparse.ArgumentParser,
                      option: str = "--mpnet-seeds", left_out: int = 1) -> dict[str, int]:
    """``"2"`` -> 2 seeds on every MPNet task; ``"sst2:3,rte:1"`` -> per task (a task left out: ``left_out``)."""
    try:
        if ":" not in text:
            return {t: int(text) for t in mpnet_tasks}
        given = {t: int(n) for t, _, n in (x.partition(":") for x in text.split(",") if x)}
    except ValueError:
        parser.error(f"{option} {text!r}: give a number or task:number pairs such as sst2:3,rte:1")
    unknown = sorted(set(given) - set(mpnet_tasks))
    if unknown:
        parser.error(f"{option} names {unknown}, which are not among --mpnet-tasks {mpnet_tasks}")
    return {t: given.get(t, left_out) for t in mpnet_tasks}


def parse_mpnet_sweep(text: str, mpnet_tasks: list[str], parser: argparse.ArgumentParser) -> dict[str, list[float]]:
    """``"rte:3e-4,rte:1e-3"`` -> ``{"rte": [3e-4, 1e-3]}``: extra lrs swept on MPNet (seed 0) per task."""
    sweep: dict[str, list[float]] = {}
    for pair in (x for x in text.split(",") if x):
        task, _, lr = pair.partition(":")
        try:
            sweep.setdefault(task, []).append(float(lr))
        except ValueError:
            parser.error(f"--mpnet-sweep {text!r}: give task:lr pairs such as rte:3e-4,rte:1e-3")
    unknown = sorted(set(sweep) - set(mpnet_tasks))
    if unknown:
        parser.error(f"--mpnet-sweep names {unknown}, which are not among --mpnet-tasks {mpnet_tasks}")
    return sweep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="data directory (../shared/data); default: "
                   "$HYPERADALORA_DATA_DIR, else the hub")
    p.add_argument("--tasks", default="sst2,rte,wnli")
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in LRS))
    p.add_argument("--seeds", type=int, default=3, help="seeds at each method's best lr")
    p.add_argument("--paper-seeds", type=int, default=1, help="seeds at the paper's lr 1e-5")
    p.add_argument("--mpnet-tasks", default="sst2,rte", help="tasks also run on MPNet ('' for none)")
    p.add_argument("--mpnet-seeds", default="1", help="seeds on MPNet: one number for every MPNet task, or per "
                   "task as task:n pairs (e.g. sst2:3,rte:1,wnli:1)")
    p.add_argument("--mpnet-paper-seeds", default="0", help="seeds on MPNet at the paper's lr 1e-5, as for "
                   "--mpnet-seeds (a task left out: 0); seed 0 comes from --mpnet-sweep where it lists 1e-5")
    p.add_argument("--mpnet-sweep", default="", help="lrs also swept on MPNet (seed 0), as task:lr pairs (e.g. "
                   "rte:3e-4,rte:1e-3); those tasks' MPNet seeds then run at the MPNet best lr")
    p.add_argument("--workers", type=int, default=2, help="runs at a time (one process each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--work-dir", default="runs/bench/convergence", help="cached runs (resume)")
    p.add_argument("--name", default="convergence")
    p.add_argument("--quick", action="store_true", help="SST-2 / MiniLM only, 100 steps, lrs 1e-5 and 1e-3, "
                   "one seed, 256 dev rows (a few minutes)")
    p.add_argument("--report-only", action="store_true", help="rebuild the tables from the cached runs")
    p.add_argument("--skip", default="", help="sweep cells not to run, as task:lr pairs (e.g. rte:3e-4,wnli:3e-4); "
                   "the report shows them empty")
    args = p.parse_args(argv)
    tasks = QUICK_TASKS if args.quick else {t: TASKS[t] for t in args.tasks.split(",") if t}
    lrs = [1e-5, 1e-3] if args.quick else [float(x) for x in args.lrs.split(",")]  # run in this order
    seeds, paper_seeds = (1, 1) if args.quick else (args.seeds, args.paper_seeds)
    mpnet_tasks = [] if args.quick else [t for t in args.mpnet_tasks.split(",") if t and t in tasks]
    mpnet_seeds = parse_mpnet_seeds(args.mpnet_seeds, mpnet_tasks, p)
    mpnet_paper_seeds = parse_mpnet_seeds(args.mpnet_paper_seeds, mpnet_tasks, p, "--mpnet-paper-seeds", 0)
    mpnet_sweep = parse_mpnet_sweep(args.mpnet_sweep, mpnet_tasks, p)
    # "convergence_quick" is convergence_quick.py's result: the quick run of this script gets its own name.
    name = args.name + ("_bench_quick" if args.quick and args.name == "convergence" else "")
    if args.quick and args.work_dir == p.get_default("work_dir"):  # other steps: never share the full runs' cache
        args.work_dir += "_quick"
    run = lambda specs: run_specs(specs, args.work_dir, args.data_dir, args.workers, args.threads,  # noqa: E731
                                  only_cached=args.report_only)

    # 1. sweep (MiniLM, seed 0)
    skip = {(t, float(lr)) for t, _, lr in (x.partition(":") for x in args.skip.split(",") if x)}
    sweep_specs = [spec(t, "minilm", m, lr, 0, tasks) for lr in lrs for t in tasks for m in METHODS
                   if (t, lr) not in skip]
    results = run(sweep_specs)
    minilm_best = best_lrs(sweep_specs, results)
    # (task, model, method) -> lr; MPNet takes the MiniLM best lr unless it has a sweep of its own
    best = {(t, model, m): minilm_best.get((t, "minilm", m)) for t in tasks for model in MODELS for m in METHODS}
    # 2. the MPNet sweep (seed 0): the MiniLM best lr and the listed ones
    mpnet_sweep_specs = [spec(t, "mpnet", m, lr, 0, tasks) for t, extra in mpnet_sweep.items() for m in METHODS
                         if best[(t, "minilm", m)] is not None
                         for lr in dict.fromkeys([best[(t, "minilm", m)], *extra])]
    results.update(run([s for s in mpnet_sweep_specs if s.key not in results]))
    best.update(best_lrs(mpnet_sweep_specs, results))
    # 3. seeds at the best lr and at the paper's lr; MPNet
    # Order: MPNet first, then seed by seed over tasks and methods, so that a run stopped early
    # holds whole (task, seed) pairs of both methods.
    more = mpnet_seed_specs(mpnet_seeds, lambda t, m: best[(t, "mpnet", m)], tasks)
    more += mpnet_paper_specs(mpnet_paper_seeds, best, tasks)
    for s in range(1, max(seeds, paper_seeds)):
        for t in tasks:
            for m in METHODS:
                if s < seeds and best[(t, "minilm", m)] is not None:
                    more.append(spec(t, "minilm", m, best[(t, "minilm", m)], s, tasks))
                if s < paper_seeds and PAPER_LR in lrs and best[(t, "minilm", m)] != PAPER_LR:
                    more.append(spec(t, "minilm", m, PAPER_LR, s, tasks))
    results.update(run([s for s in more if s.key not in results]))
    report(results, best, tasks, lrs, sweep_specs + mpnet_sweep_specs, mpnet_sweep, name, args)
    return 0


def mpnet_seed_specs(seeds: dict[str, int], lr_for: Callable[[str, str], float | None],
                     tasks: dict) -> list[RunSpec]:
    """MPNet runs seed by seed: ``seeds[task]`` seeds of each method at ``lr_for(task, method)``.

    Seed-major order, so that a run stopped early holds whole (task, seed) pairs of both methods;
    a method whose ``lr_for`` is ``None`` gets no runs on that task.
    """
    lrs = {(t, m): lr_for(t, m) for t in seeds for m in METHODS}
    return [spec(t, "mpnet", m, lrs[(t, m)], s, tasks) for s in range(max(seeds.values(), default=0))
            for t in seeds for m in METHODS if s < seeds[t] and lrs[(t, m)] is not None]


def mpnet_paper_specs(seeds: dict[str, int], best: dict, tasks: dict) -> list[RunSpec]:
    """MPNet runs at the paper's lr: ``seeds[task]`` seeds of each method, seed by seed.

    A method whose MPNet best lr is the paper's gets none: its seed runs at the best lr are these.
    """
    return mpnet_seed_specs(seeds, lambda t, m: None if best[(t, "mpnet", m)] == PAPER_LR else PAPER_LR, tasks)


def best_lrs(specs: list[RunSpec], results: dict) -> dict[tuple[str, str, str], float | None]:
    """(task, model, method) -> the best lr (:func:`best_lr`) among the runs of ``specs`` that ran."""
    groups: dict[tuple[str, str, str], list] = {}
    for s in specs:
        if s.key in results:
            groups.setdefault((s.tags["task"], s.tags["model"], s.tags["method"]), []).append(results[s.key])
    return {group: best_lr(curves) for group, curves in groups.items()}


def report(results: dict, best: dict, tasks: dict, lrs: list, sweep_specs: list[RunSpec], mpnet_sweep: dict,
           name: str, args) -> None:
    runs = list(results.values())
    lrs = sorted(lrs)
    rows, table, panels, targets = [], [], {}, {}
    order = lambda s: (list(tasks).index(s.tags["task"]), list(MODELS).index(s.tags["model"]),  # noqa: E731
                       list(METHODS).index(s.tags["method"]), s.tags["lr"])
    sweep = [{"task": s.tags["task"], "model": s.tags["model"], "method": s.tags["method"], "lr": s.tags["lr"],
              "final_smoothed_loss": r["final_smoothed"], "diverged": r["diverged"],
              "best": best[(s.tags["task"], s.tags["model"], s.tags["method"])] == s.tags["lr"]}
             for s in sorted(sweep_specs, key=order) if (r := results.get(s.key))]
    for t in tasks:
        for model in ("minilm", "mpnet"):
            for setting in ("paper_lr", "own_best_lr"):
                lr_of = {m: PAPER_LR if setting == "paper_lr" else best[(t, model, m)] for m in METHODS}
                group = {m: [r for r in runs if r["tags"]["task"] == t and r["tags"]["model"] == model
                             and r["tags"]["method"] == m and lr_of[m] is not None
                             and abs(r["lr"] - lr_of[m]) < 1e-12] for m in METHODS}
                base = [r["final_smoothed"] for r in group["adalora"] if r["final_smoothed"] is not None]
                if not base or not group["hyperadalora"]:
                    continue
                target = statistics.mean(base)
                summary = {}
                for m, group_runs in group.items():
                    for r in sorted(group_runs, key=lambda r: r["seed"]):
                        steps, secs = first_reach(r["losses"], r["step_times"], target)
                        acc = (r["final_metrics"] or {}).get("accuracy")
                        rows.append({"task": t, "model": model, "method": m, "seed": r["seed"], "lr": r["lr"],
                                     "lr_setting": setting, "target_loss": target, "steps_to_target": steps,
                                     "seconds_to_target": secs, "dev_accuracy": acc,
                                     "final_smoothed_loss": r["final_smoothed"],
                                     "seconds_per_step": statistics.mean(r["step_times"]) if r["step_times"] else None})
                    mine = [x for x in rows if x["task"] == t and x["model"] == model and x["method"] == m
                            and x["lr_setting"] == setting]
                    accs = [x["dev_accuracy"] for x in mine if x["dev_accuracy"] is not None]
                    reached = [x for x in mine if x["steps_to_target"] is not None]
                    summary[m] = {
                        "lr": lr_of[m], "n": len(mine), "reached": len(reached),
                        "steps": mean_or_none(x["steps_to_target"] for x in mine),
                        "seconds": mean_or_none(x["seconds_to_target"] for x in mine),
                        "final": statistics.mean(x["final_smoothed_loss"] for x in mine
                                                 if x["final_smoothed_loss"] is not None) if mine else None,
                        "acc": statistics.mean(accs) if accs else None,
                        "acc_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "sps": statistics.mean(x["seconds_per_step"] for x in mine if x["seconds_per_step"]),
                    }
                # How far AdaLoRA's loss fell below its start: near 0, the target is the starting loss and
                # "steps to target" only measures batch-to-batch noise.
                start = statistics.mean(statistics.mean(r["losses"][:10]) for r in group["adalora"])
                drop = start - target
                a, h = summary["adalora"], summary["hyperadalora"]
                ratio = (h["steps"] / a["steps"]) if h["steps"] and a["steps"] else None
                for m, s in summary.items():
                    table.append([t, model, setting.replace("_", " "), m, f"{s['lr']:g}", f"{s['reached']}/{s['n']}",
                                  fmt(s["final"]), fmt(s["steps"], ".0f"), fmt(s["seconds"], ".0f"),
                                  f"{s['sps']:.3f}", f"{fmt(s['acc'], '.3f', 'n/a')} ± {s['acc_sd']:.3f}",
                                  fmt(ratio, ".2f", "n/a") if m == "hyperadalora" else "",
                                  f"{drop:.3f}" if m == "adalora" else ""])
                title = f"{t} / {model} / {setting.replace('_', ' ')}"
                panels[title] = {f"{m} lr {lr_of[m]:g}": [r["losses"] for r in group[m]] for m in METHODS}
                targets[title] = target
    lines = [
        "Target: AdaLoRA's smoothed training loss at its last step (mean over its seeds); steps / seconds to "
        "target: means over the seeds that ran (`never` if any seed never reached it); dev accuracy: mean ± sd. "
        "AdaLoRA loss drop: its mean loss over the first 10 steps minus the target; where it is near 0 the loss "
        "never left its start and steps to target only measure batch noise.", "",
        *markdown_table(["task", "model", "lr setting", "method", "lr", "reached", "final loss", "steps to target",
                         "s to target", "s/step", "dev acc", "steps hyper/adalora", "AdaLoRA loss drop"], table),
        *sweep_table(sweep, "minilm", list(tasks)),
        *(sweep_table(sweep, "mpnet", list(mpnet_sweep)) if mpnet_sweep else []),
        "", "`*`: the method's best lr on that task (lowest final smoothed training loss).",
    ]
    curves = [{"key": r["key"], **r["tags"], "losses": [round(x, 5) for x in r["losses"]],
               "step_times": r["step_times"], "final_metrics": r["final_metrics"], "diverged": r["diverged"],
               "total_rank": r["total_rank"]} for r in runs]
    config = {"tasks": tasks, "lrs": lrs, "base_config": BASE, "models": MODELS, "paper_lr": PAPER_LR,
              "seeds": args.seeds, "paper_seeds": args.paper_seeds, "mpnet_tasks": args.mpnet_tasks,
              "mpnet_seeds": args.mpnet_seeds, "mpnet_paper_seeds": args.mpnet_paper_seeds,
              "mpnet_sweep": args.mpnet_sweep, "workers": args.workers, "threads_per_run": args.threads,
              "skipped_sweep_cells": args.skip,
              "target_definition": "mean over AdaLoRA seeds of the smoothed (EMA 0.9, bias-corrected) training "
                                   "task loss at the last step, per task, model and lr setting"}
    write_result(RESULTS, name, {"config": config, "rows": rows, "sweep": sweep, "curves": curves}, lines)
    if panels:
        own = {k: v for k, v in panels.items() if "own best" in k}
        paper = {k: v for k, v in panels.items() if "paper" in k}
        for suffix, chosen in (("", own), ("_paper_lr", paper)):
            if chosen:
                plot_curve_groups({}, RESULTS / f"{name}{suffix}.png", "AdaLoRA vs HyperAdaLoRA: smoothed "
                                  "training loss, mean and min-max over seeds", target=targets, panels=chosen)
    print("\n".join(lines))


def sweep_table(sweep: list[dict], model: str, tasks: list[str]) -> list[str]:
    """The markdown lines of one model's lr sweep: final smoothed loss per task, method and lr."""
    cells = [s for s in sweep if s["model"] == model]
    lrs = sorted({s["lr"] for s in cells})
    return ["", f"Learning-rate sweep ({MODEL_NAMES[model]}, seed 0): final smoothed training loss", "",
            *markdown_table(["task", "method"] + [f"{lr:g}" for lr in lrs],
                            [[t, m] + [next((fmt(s["final_smoothed_loss"]) + (" *" if s["best"] else "")
                                             for s in cells if s["task"] == t and s["method"] == m and s["lr"] == lr),
                                            "") for lr in lrs] for t in tasks for m in METHODS])]


if __name__ == "__main__":
    sys.exit(main())
