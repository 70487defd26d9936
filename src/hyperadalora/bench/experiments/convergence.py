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

    hyperadalora bench convergence --data-dir ../shared/data [--workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

from ..curves import best_lr, first_reach, mean_or_none
from ..experiment import Command, experiment
from ..report import fmt, markdown_table, plot_curve_groups
from ..runner import RunSpec, run_specs
from .common import MINILM_ENCODER_LINEARS, PAPER_HIDDEN, result_path, write_results

PAPER_LR = 1e-5
LRS = (1e-5, 1e-4, 3e-4, 1e-3, 3e-3)
METHODS = {"adalora": "direct", "hyperadalora": "hyper"}
MODEL_NAMES = {"minilm": "MiniLM", "mpnet": "MPNet"}
MODELS = {
    "minilm": {"adapter.target_modules": MINILM_ENCODER_LINEARS, "adapter.lora_alpha": 16},
    "mpnet": {"adapter.target_modules": r".*encoder\.layer\.\d+\.(attention\.attn\.(q|k|v|o)|intermediate\.dense"
                                        r"|output\.dense)",
              "adapter.lora_alpha": 32},
}
# steps x batch 16: SST-2 learns within a few hundred steps; RTE (first 512 rows) and WNLI (all 635)
# get three epochs, since in one their loss barely moves. MRPC and CoLA get 400 steps (1.7 and 0.75
# epochs): in 200 their loss stayed near the label prior (BENCHMARKS section 11).
TASKS = {
    "sst2": {"steps": 200, "max_length": 64},
    "rte": {"steps": 96, "max_length": 128, "train_rows": 512},
    "wnli": {"steps": 120, "max_length": 128},
    "mrpc": {"steps": 400, "max_length": 128},
    "cola": {"steps": 400, "max_length": 64},
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
    # SST-2 / MiniLM / seed 0 adapters are kept for the similarity experiment.
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


INTRO = ("Target: AdaLoRA's smoothed training loss at its last step (mean over its seeds); steps / seconds to "
         "target: means over the seeds that ran (`never` if any seed never reached it); dev accuracy: mean ± sd. "
         "AdaLoRA loss drop: its mean loss over the first 10 steps minus the target; where it is near 0 the loss "
         "never left its start and steps to target only measure batch noise.")
HEADER = ["task", "model", "lr setting", "method", "lr", "reached", "final loss", "steps to target", "s to target",
          "s/step", "dev acc", "steps hyper/adalora", "AdaLoRA loss drop"]


def render(result: dict) -> list[str]:
    """The markdown of a convergence result: the compared pairs, then the lr sweeps."""
    groups: dict[tuple, list[dict]] = {}
    for row in result["rows"]:
        groups.setdefault((row["task"], row["model"], row["lr_setting"]), []).append(row)
    table = [line for (t, model, setting), rows in groups.items()
             for line in pair_table(t, model, setting, rows, result["curves"])]
    mpnet_sweep = list(dict.fromkeys(x.partition(":")[0] for x in result["config"].get("mpnet_sweep", "").split(",")
                                     if x))
    return [INTRO, "", *markdown_table(HEADER, table),
            *sweep_table(result["sweep"], "minilm", list(result["config"]["tasks"])),
            *(sweep_table(result["sweep"], "mpnet", mpnet_sweep) if mpnet_sweep else []),
            "", "`*`: the method's best lr on that task (lowest final smoothed training loss)."]


def pair_table(task: str, model: str, setting: str, rows: list[dict], curves: list[dict]) -> list[list[str]]:
    """The two table lines (AdaLoRA, HyperAdaLoRA) of one (task, model, lr setting)."""
    summary = {m: summarize([x for x in rows if x["method"] == m]) for m in METHODS}
    # How far AdaLoRA's loss fell below its start: near 0, the target is the starting loss and
    # "steps to target" only measures batch-to-batch noise.
    ada = [x for x in rows if x["method"] == "adalora"]
    losses = [c["losses"] for x in ada for c in curves if (c["task"], c["model"], c["method"], c["seed"]) ==
              (task, model, "adalora", x["seed"]) and abs(c["lr"] - x["lr"]) < 1e-12]
    drop = statistics.mean(statistics.mean(ls[:10]) for ls in losses) - ada[0]["target_loss"]
    a, h = summary["adalora"], summary["hyperadalora"]
    ratio = (h["steps"] / a["steps"]) if h["steps"] and a["steps"] else None
    return [[task, model, setting.replace("_", " "), m, f"{s['lr']:g}", f"{s['reached']}/{s['n']}", fmt(s["final"]),
             fmt(s["steps"], ".0f"), fmt(s["seconds"], ".0f"), f"{s['sps']:.3f}",
             f"{fmt(s['acc'], '.3f', 'n/a')} ± {s['acc_sd']:.3f}",
             fmt(ratio, ".2f", "n/a") if m == "hyperadalora" else "", f"{drop:.3f}" if m == "adalora" else ""]
            for m, s in summary.items()]


def summarize(mine: list[dict]) -> dict:
    """Means over one method's seeds: steps / seconds to target, final loss, dev accuracy (and its sd)."""
    accs = [x["dev_accuracy"] for x in mine if x["dev_accuracy"] is not None]
    finals = [x["final_smoothed_loss"] for x in mine if x["final_smoothed_loss"] is not None]
    return {"lr": mine[0]["lr"], "n": len(mine), "reached": sum(x["steps_to_target"] is not None for x in mine),
            "steps": mean_or_none(x["steps_to_target"] for x in mine),
            "seconds": mean_or_none(x["seconds_to_target"] for x in mine),
            "final": statistics.mean(finals) if mine else None,
            "acc": statistics.mean(accs) if accs else None,
            "acc_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "sps": statistics.mean(x["seconds_per_step"] for x in mine if x["seconds_per_step"])}


def sweep_table(sweep: list[dict], model: str, tasks: list[str]) -> list[str]:
    """The markdown lines of one model's lr sweep: final smoothed loss per task, method and lr."""
    cells = [s for s in sweep if s.get("model", "minilm") == model]  # the first results swept MiniLM only
    lrs = sorted({s["lr"] for s in cells})
    return ["", f"Learning-rate sweep ({MODEL_NAMES[model]}, seed 0): final smoothed training loss", "",
            *markdown_table(["task", "method"] + [f"{lr:g}" for lr in lrs],
                            [[t, m] + [next((fmt(s["final_smoothed_loss"]) + (" *" if s["best"] else "")
                                             for s in cells if s["task"] == t and s["method"] == m and s["lr"] == lr),
                                            "") for lr in lrs] for t in tasks for m in METHODS])]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of :func:`main` (``name``: the result it writes, ``_bench_quick`` added for ``--quick``)."""
    p = argparse.ArgumentParser(prog="hyperadalora bench convergence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args.parser = p
    # "convergence_quick" is that experiment's result: the quick run of this one gets its own name.
    args.name += "_bench_quick" if args.quick and args.name == "convergence" else ""
    if args.quick and args.work_dir == p.get_default("work_dir"):  # never share the full runs' cache
        args.work_dir += "_quick"
    return args


@experiment("convergence", section="## 1. Convergence (paper Fig. 2): AdaLoRA vs HyperAdaLoRA on GLUE",
            title="1. AdaLoRA vs HyperAdaLoRA convergence on RTE / WNLI / SST-2, MiniLM + MPNet",
            parse_args=parse_args, render=render,
            commands=[Command("convergence", ("--lrs", "1e-5,1e-4,1e-3,3e-3,3e-4", "--mpnet-tasks", "sst2,rte,wnli",
                                              "--mpnet-sweep", "sst2:1e-5,rte:3e-4,rte:1e-3,rte:1e-5",
                                              "--mpnet-seeds", "sst2:3,rte:3,wnli:3", "--mpnet-paper-seeds", "3",
                                              "--paper-seeds", "3")),
                      Command("convergence_bench_quick", ("--quick",), group="quick"),
                      # AdaLoRA's best lr is 3e-3, the top of the committed grid: the grid goes on up
                      # until every method's best lies inside it (MiniLM; MPNet SST-2 and RTE swept too).
                      Command("convergence_lr_grid", ("--lrs", "1e-5,1e-4,1e-3,3e-3,3e-4,1e-2,3e-2",
                                                      "--mpnet-tasks", "sst2,rte,wnli", "--mpnet-sweep",
                                                      "sst2:1e-5,sst2:1e-3,sst2:3e-3,sst2:1e-2,sst2:3e-2,"
                                                      "rte:3e-4,rte:1e-3,rte:1e-5,rte:1e-2,rte:3e-2",
                                                      "--mpnet-seeds", "sst2:3,rte:3,wnli:3", "--mpnet-paper-seeds",
                                                      "3", "--paper-seeds", "3", "--name", "convergence_lr_grid"),
                              group="pending")])
def main(argv: list[str] | None = None) -> int:
    """Runs (or reads from the cache) every run of the protocol and writes ``results/<name>.*``."""
    args = parse_args(argv)
    p = args.parser
    tasks = QUICK_TASKS if args.quick else {t: TASKS[t] for t in args.tasks.split(",") if t}
    lrs = [1e-5, 1e-3] if args.quick else [float(x) for x in args.lrs.split(",")]  # run in this order
    mpnet_tasks = [] if args.quick else [t for t in args.mpnet_tasks.split(",") if t and t in tasks]
    mpnet_sweep = parse_mpnet_sweep(args.mpnet_sweep, mpnet_tasks, p)
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
    more = seed_specs(args, tasks, lrs, mpnet_tasks, best)
    results.update(run([s for s in more if s.key not in results]))
    result = build_result(results, best, tasks, lrs, sweep_specs + mpnet_sweep_specs, args)
    lines = render(result)
    write_results(args.name, result, lines)
    plot(result, args.name)
    print("\n".join(lines))
    return 0


def seed_specs(args: argparse.Namespace, tasks: dict, lrs: list[float], mpnet_tasks: list[str],
               best: dict) -> list[RunSpec]:
    """The runs after the sweeps: MPNet first, then seed by seed over tasks and methods.

    In this order a run stopped early holds whole (task, seed) pairs of both methods.
    """
    seeds, paper_seeds = (1, 1) if args.quick else (args.seeds, args.paper_seeds)
    mpnet_seeds = parse_mpnet_seeds(args.mpnet_seeds, mpnet_tasks, args.parser)
    mpnet_paper_seeds = parse_mpnet_seeds(args.mpnet_paper_seeds, mpnet_tasks, args.parser, "--mpnet-paper-seeds", 0)
    more = mpnet_seed_specs(mpnet_seeds, lambda t, m: best[(t, "mpnet", m)], tasks)
    more += mpnet_paper_specs(mpnet_paper_seeds, best, tasks)
    for s in range(1, max(seeds, paper_seeds)):
        for t in tasks:
            for m in METHODS:
                if s < seeds and best[(t, "minilm", m)] is not None:
                    more.append(spec(t, "minilm", m, best[(t, "minilm", m)], s, tasks))
                if s < paper_seeds and PAPER_LR in lrs and best[(t, "minilm", m)] != PAPER_LR:
                    more.append(spec(t, "minilm", m, PAPER_LR, s, tasks))
    return more


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


def build_result(results: dict, best: dict, tasks: dict, lrs: list, sweep_specs: list[RunSpec],
                 args: argparse.Namespace) -> dict:
    """The result JSON: ``rows`` (one per run of a compared pair), ``sweep``, ``curves``, ``config``."""
    runs = list(results.values())
    order = lambda s: (list(tasks).index(s.tags["task"]), list(MODELS).index(s.tags["model"]),  # noqa: E731
                       list(METHODS).index(s.tags["method"]), s.tags["lr"])
    sweep = [{"task": s.tags["task"], "model": s.tags["model"], "method": s.tags["method"], "lr": s.tags["lr"],
              "final_smoothed_loss": r["final_smoothed"], "diverged": r["diverged"],
              "best": best[(s.tags["task"], s.tags["model"], s.tags["method"])] == s.tags["lr"]}
             for s in sorted(sweep_specs, key=order) if (r := results.get(s.key))]
    rows = [row for t in tasks for model in MODELS for setting in ("paper_lr", "own_best_lr")
            for row in pair_rows(runs, t, model, setting, best)]
    curves = [{"key": r["key"], **r["tags"], "losses": [round(x, 5) for x in r["losses"]],
               "step_times": r["step_times"], "final_metrics": r["final_metrics"], "diverged": r["diverged"],
               "total_rank": r["total_rank"]} for r in runs]
    config = {"tasks": tasks, "lrs": sorted(lrs), "base_config": BASE, "models": MODELS, "paper_lr": PAPER_LR,
              "seeds": args.seeds, "paper_seeds": args.paper_seeds, "mpnet_tasks": args.mpnet_tasks,
              "mpnet_seeds": args.mpnet_seeds, "mpnet_paper_seeds": args.mpnet_paper_seeds,
              "mpnet_sweep": args.mpnet_sweep, "workers": args.workers, "threads_per_run": args.threads,
              "skipped_sweep_cells": args.skip,
              "target_definition": "mean over AdaLoRA seeds of the smoothed (EMA 0.9, bias-corrected) training "
                                   "task loss at the last step, per task, model and lr setting"}
    return {"config": config, "rows": rows, "sweep": sweep, "curves": curves}


def pair_rows(runs: list[dict], task: str, model: str, setting: str, best: dict) -> list[dict]:
    """The rows of one (task, model, lr setting): every seed of both methods, against AdaLoRA's target.

    Empty when AdaLoRA has no finished run there or HyperAdaLoRA no run at all.
    """
    lr_of = {m: PAPER_LR if setting == "paper_lr" else best[(task, model, m)] for m in METHODS}
    group = {m: sorted((r for r in runs if r["tags"]["task"] == task and r["tags"]["model"] == model
                        and r["tags"]["method"] == m and lr_of[m] is not None and abs(r["lr"] - lr_of[m]) < 1e-12),
                       key=lambda r: r["seed"]) for m in METHODS}
    base = [r["final_smoothed"] for r in group["adalora"] if r["final_smoothed"] is not None]
    if not base or not group["hyperadalora"]:
        return []
    target = statistics.mean(base)
    rows = []
    for m, group_runs in group.items():
        for r in group_runs:
            steps, secs = first_reach(r["losses"], r["step_times"], target)
            rows.append({"task": task, "model": model, "method": m, "seed": r["seed"], "lr": r["lr"],
                         "lr_setting": setting, "target_loss": target, "steps_to_target": steps,
                         "seconds_to_target": secs, "dev_accuracy": (r["final_metrics"] or {}).get("accuracy"),
                         "final_smoothed_loss": r["final_smoothed"],
                         "seconds_per_step": statistics.mean(r["step_times"]) if r["step_times"] else None})
    return rows


def plot(result: dict, name: str) -> None:
    """``<name>.png`` (each method at its best lr) and ``<name>_paper_lr.png`` (both at 1e-5)."""
    panels: dict[str, dict[str, list]] = {}
    targets: dict[str, float] = {}
    for row in result["rows"]:
        title = f"{row['task']} / {row['model']} / {row['lr_setting'].replace('_', ' ')}"
        curve = next(c["losses"] for c in result["curves"] if (c["task"], c["model"], c["method"], c["seed"]) ==
                     (row["task"], row["model"], row["method"], row["seed"]) and abs(c["lr"] - row["lr"]) < 1e-12)
        panels.setdefault(title, {}).setdefault(f"{row['method']} lr {row['lr']:g}", []).append(curve)
        targets[title] = row["target_loss"]
    for suffix, kind in (("", "own best"), ("_paper_lr", "paper")):
        chosen = {k: v for k, v in panels.items() if kind in k}
        if chosen:
            plot_curve_groups({}, result_path(name + suffix), "AdaLoRA vs HyperAdaLoRA: smoothed training loss, "
                              "mean and min-max over seeds", target=targets, panels=chosen)
