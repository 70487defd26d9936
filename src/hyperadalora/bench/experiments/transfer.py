"""Issue 20 item 2: amortised hypernetworks. Does a HyperAdaLoRA started from another task's
hypernetworks reach a tuned AdaLoRA's target sooner than AdaLoRA, from scratch or started alike?

Protocol (the convergence experiment's, ``convergence.BASE``; MiniLM):

* Source (``--source``, CoLA by default): 200 steps, seed 0, each method at its best lr on SST-2
  in ``convergence.json`` (AdaLoRA 3e-3, HyperAdaLoRA 1e-3); the run folders are kept.
* Target (``--target``, SST-2 by default: the one GLUE task whose loss falls well past its label
  prior within 200 steps on MiniLM; on MRPC at lr 1e-3 AdaLoRA's loss only went from 0.67 to
  0.60-0.65 in 200 steps, about the label prior, so steps to a target there measure noise): four
  arms, ``adalora`` and ``hyperadalora`` from scratch and ``...-from-<source>`` started from the
  source run of the same method (``adapter.init_from``:
  the trained factors, or the hypernetworks with their factor states; the task head, the
  allocator and the schedule start fresh).
* Every arm gets its own lr sweep (``--lrs``, seed 0); its best lr (lowest final smoothed loss)
  must lie inside the grid, else the table says so. Then ``--seeds`` seeds at that lr.
* Target loss: AdaLoRA-from-scratch's mean final smoothed loss at its best lr. Steps to target
  per seed, paired by seed against AdaLoRA from scratch: mean ratio, 95% t interval of the
  difference, paired t-test (a seed that never reaches the target counts as ``steps + 1``,
  censored, and the table says how many did not).

* ``--multitask cola,mrpc`` adds a fifth arm, ``hyperadalora-from-cola+mrpc``: a HyperAdaLoRA
  started from hypernetworks trained on those tasks together (``hyperadalora multitask``: one task
  embedding each, round robin, 200 steps per task, seed 0, HyperAdaLoRA's source lr, the longest
  of the tasks' max_length); the target run has one task embedding, started at the mean of theirs.

Usage::

    hyperadalora bench transfer --data-dir ../shared/data [--source cola] [--target sst2] [--seeds 5]
    hyperadalora bench transfer --data-dir ../shared/data --multitask cola,mrpc --name transfer_multitask
"""

from __future__ import annotations

import argparse
import math
import statistics

from pathlib import Path

from ..curves import best_lr, first_reach, smoothed_final
from ..experiment import Command, experiment
from ..report import fmt, markdown_table, plot_curve_groups
from ..runner import RunSpec, adopt_cached, run_specs
from ..stats import mean_ci, paired_test
from . import convergence as conv
from .common import result_path, write_results
from .tuned import extend

SOURCE_LRS = {"adalora": 3e-3, "hyperadalora": 1e-3}  # convergence.json: best on SST-2 / MiniLM
TASKS = {"sst2": conv.TASKS["sst2"], "mrpc": {"steps": 200, "max_length": 128},
         "cola": {"steps": 200, "max_length": 64}}
METHOD_NAMES = ("adalora", "hyperadalora")


def arms(source: str, multitask: str | None = None) -> tuple[str, ...]:
    """The arms: each method started from ``source`` (and HyperAdaLoRA from the ``multitask``
    hypernetworks), then from scratch (the started arms run first: the scratch arms are usually
    the tuned experiment's runs, taken with ``--reuse``)."""
    started = [f"{m}-from-{source}" for m in METHOD_NAMES]
    if multitask:
        started.append(f"hyperadalora-from-{multitask_label(multitask)}")
    return (*started, *METHOD_NAMES)


def multitask_label(tasks: str) -> str:
    """``"cola,mrpc"`` -> ``"cola+mrpc"`` (the arm's and the source run's name)."""
    return "+".join(t for t in tasks.split(",") if t)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The experiment's options."""
    p = argparse.ArgumentParser(prog="hyperadalora bench transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--source", default="cola", choices=sorted(TASKS))
    p.add_argument("--target", default="sst2", choices=sorted(TASKS))
    p.add_argument("--multitask", default=None, metavar="TASKS",
                   help="comma-separated source tasks of a multi-task HyperAdaLoRA (a fifth arm), e.g. cola,mrpc")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="each arm's lr grid (seed 0)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--max-extend", type=int, default=1,
                   help="how many times an arm's grid grows by one lr past an edge best")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default="runs/bench/transfer")
    p.add_argument("--reuse", default="runs/bench/tuned",
                   help="another benchmark's cache whose identical runs are taken, not run again (the scratch arms "
                        "are the tuned experiment's AdaLoRA and HyperAdaLoRA runs on the same protocol)")
    p.add_argument("--name", default="transfer")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.source == args.target:
        p.error(f"--source and --target are both {args.target}: transfer needs another task")
    if args.seeds < 2:
        p.error("--seeds must be at least 2 (the paired test needs two seeds)")
    if args.multitask is not None:
        tasks = [t for t in args.multitask.split(",") if t]
        if len(set(tasks)) < 2 or not set(tasks) <= set(TASKS) or args.target in tasks:
            p.error(f"--multitask {args.multitask!r}: two or more distinct tasks of {sorted(TASKS)}, not the target "
                    f"{args.target}")
    return args


def method_of(arm: str) -> str:
    """``adalora-from-sst2`` -> ``adalora``."""
    return arm.split("-from-")[0]


def source_spec(source: str, method: str) -> RunSpec:
    """The kept ``source`` run an arm ``<method>-from-<source>`` starts from."""
    base = conv.spec(source, "minilm", method, SOURCE_LRS[method], 0, TASKS)
    return RunSpec(key=f"source-{base.key}", config=base.config, overrides=base.overrides, keep_run_dir=True,
                   tags={**base.tags, "role": "source"})


def multitask_source(args: argparse.Namespace) -> dict:
    """The multi-task HyperAdaLoRA source run (``--multitask``), trained once and kept in the cache:
    ``{"run_dir", "extra", "final"}`` (``extra``: what its target runs add, one task embedding;
    ``final``: each source task's held-out metrics)."""
    import json
    import shutil

    from ...train import load_run_config
    from ...train.multitask import train_multitask

    tasks = [t for t in args.multitask.split(",") if t]
    base = conv.spec(tasks[0], "minilm", "hyperadalora", SOURCE_LRS["hyperadalora"], 0, TASKS)
    name = f"source-multitask-{multitask_label(args.multitask)}-minilm-hyperadalora-s0"
    run_dir = Path(args.work_dir) / "runs" / name
    overrides = {**base.overrides, "steps": sum(TASKS[t]["steps"] for t in tasks),
                 "max_length": max(TASKS[t]["max_length"] for t in tasks), "output_dir": str(run_dir.parent),
                 "run_name": name, "progress": False, "threads": args.threads}
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    done = run_dir / "eval.json"
    if not (done.is_file() and json.loads(done.read_text()).get("status") == "completed"):
        if args.report_only:
            raise SystemExit(f"transfer: the multi-task source {run_dir} has not run (drop --report-only)")
        shutil.rmtree(run_dir, ignore_errors=True)  # a killed run starts again
        train_multitask(load_run_config(base.config, overrides), tasks)
    return {"run_dir": str(run_dir), "extra": {"adapter.hyper.task_embeddings": 1},
            "final": json.loads(done.read_text())["tasks"]}


def target_spec(arm: str, target: str, lr: float, seed: int, origins: dict[str, dict]) -> RunSpec:
    """One target run of ``arm`` (a scratch arm's run is the convergence protocol's, under its key);
    ``origins``: each started arm's ``{"run_dir", "extra"}``."""
    if arm == method_of(arm):
        base = conv.spec(target, "minilm", arm, lr, seed, TASKS)
        return RunSpec(key=base.key, config=base.config, overrides=base.overrides, tags={**base.tags, "arm": arm})
    origin = origins[arm]
    base = conv.spec(target, "minilm", method_of(arm), lr, seed, TASKS,
                     {"adapter.init_from": origin["run_dir"], **origin.get("extra", {})})
    return RunSpec(key=f"transfer-{target}-minilm-{arm}-lr{lr:g}-s{seed}", config=base.config, overrides=base.overrides,
                   tags={**base.tags, "arm": arm})


def run(args: argparse.Namespace, specs: list[RunSpec]) -> dict[str, dict]:
    """``run_specs`` on the experiment's cache, after taking what ``--reuse`` already holds."""
    if args.reuse and not args.report_only:
        adopt_cached(specs, args.reuse, args.work_dir)
    return run_specs(specs, args.work_dir, args.data_dir, args.workers, args.threads, only_cached=args.report_only)


def paired_steps(ours: list[int | None], reference: list[int | None], budget: int) -> dict:
    """Steps to target of an arm against the reference, paired by seed (``None``: never, censored at budget + 1).

    Returns:
        ``mean_ratio`` (mean of per-seed ours / reference), ``diff_mean`` and its 95% t interval
        ``diff_ci`` (ours - reference, steps), ``p_value`` of the paired t-test (``None`` when the
        differences are all equal), and ``never`` (seeds of ours that never reached it).
    """
    a = [budget + 1 if s is None else s for s in ours]
    b = [budget + 1 if s is None else s for s in reference]
    mean, half = mean_ci([x - y for x, y in zip(a, b)])
    test = paired_test(dict(enumerate(a)), dict(enumerate(b)))
    p_value = None if test is None or math.isnan(test.p) else test.p
    half = math.nan if half is None else half
    return {"mean_ratio": statistics.fmean(x / y for x, y in zip(a, b)), "diff_mean": mean,
            "diff_ci": [mean - half, mean + half], "p_value": p_value, "never": sum(s is None for s in ours)}


def best_lrs(args: argparse.Namespace, lrs: list[float], origins: dict
             ) -> tuple[dict[str, float], dict[str, list[float]], list[dict]]:
    """Every arm's lr sweep (seed 0), grown by one step of the tuned experiment's ladder past an edge
    best (:func:`.tuned.extend`, ``--max-extend`` times).

    Returns:
        ``({arm: best lr}, {arm: its grid}, [{"arm", "lr", "final_smoothed"} of every sweep run])``.
    """
    grids = {arm: sorted(lrs) for arm in arms(args.source, args.multitask)}
    for round_ in range(args.max_extend + 1):
        specs = [target_spec(arm, args.target, lr, 0, origins) for arm, grid in grids.items() for lr in grid]
        swept = run(args, specs)
        runs = {arm: [swept[s.key] for s in specs if s.tags["arm"] == arm and s.key in swept] for arm in grids}
        missing = [arm for arm, rs in runs.items() if best_lr(rs) is None]
        if missing:
            raise SystemExit(f"transfer: no finished sweep run for {missing} in {args.work_dir}")
        best = {arm: best_lr(rs) for arm, rs in runs.items()}
        grown = {arm: nxt for arm, grid in grids.items() if (nxt := extend(grid, best[arm])) is not None}
        if not grown or round_ == args.max_extend:  # report-only: the grown lrs are read from the cache
            break
        for arm, lr in grown.items():
            grids[arm] = sorted({*grids[arm], lr})
    table = [{"arm": s.tags["arm"], "lr": s.tags["lr"], "final_smoothed": smoothed_final(swept[s.key]["losses"])}
             for s in specs if s.key in swept]
    return best, grids, table


def seed_runs(args: argparse.Namespace, lrs: dict[str, float], origins: dict) -> dict[str, list[dict]]:
    """Every arm's seeds at its best lr, seed-major (a stopped run leaves the arms equally far)."""
    specs = [target_spec(arm, args.target, lrs[arm], seed, origins) for seed in range(args.seeds) for arm in lrs]
    done = run(args, specs)
    return {arm: sorted((done[s.key] for s in specs if s.tags["arm"] == arm and s.key in done),
                        key=lambda r: r["seed"]) for arm in lrs}


def arm_rows(arm: str, lr: float, runs: list[dict], target_loss: float, lrs: list[float]) -> dict:
    """The per-seed figures of one arm at its best lr."""
    steps = [first_reach(r["losses"], r["step_times"], target_loss)[0] for r in runs]
    metric = [r["final_metrics"].get("f1", r["final_metrics"].get("accuracy")) for r in runs]
    return {"arm": arm, "lr": lr, "lr_inside_grid": min(lrs) < lr < max(lrs), "seeds": [r["seed"] for r in runs],
            "steps_to_target": steps, "final_smoothed": [smoothed_final(r["losses"]) for r in runs],
            "dev_metric": metric}


@experiment("transfer", section="## 11. Amortised hypernetworks: transfer from another task (issue 20 item 2)",
            title="11. a HyperAdaLoRA started from CoLA's hypernetworks vs AdaLoRA on SST-2, from scratch and started alike",
            parse_args=parse_args, render=lambda result: render(result),
            commands=[Command("transfer", ("--source", "cola", "--target", "sst2", "--seeds", "5", "--workers", "1")),
                      Command("transfer_multitask", ("--source", "cola", "--target", "sst2", "--multitask", "cola,mrpc",
                                                     "--seeds", "5", "--workers", "1", "--name", "transfer_multitask"))])
def main(argv: list[str] | None = None) -> int:
    """Runs the sources, each arm's sweep and seeds, and writes ``results/<name>.*``."""
    args = parse_args(argv)
    lrs = [float(x) for x in args.lrs.split(",")]
    sources = run(args, [source_spec(args.source, m) for m in METHOD_NAMES])
    sources = {r["tags"]["method"]: r for r in sources.values()}
    origins = {f"{m}-from-{args.source}": {"run_dir": r["run_dir"]} for m, r in sources.items()}
    if args.multitask:
        origins[f"hyperadalora-from-{multitask_label(args.multitask)}"] = multitask_source(args)
    lrs_found, grids, swept = best_lrs(args, lrs, origins)
    found = seed_runs(args, lrs_found, origins)
    target_loss = statistics.fmean(smoothed_final(r["losses"]) for r in found["adalora"])
    budget = TASKS[args.target]["steps"]
    shown = [a for m in METHOD_NAMES for a in (m, f"{m}-from-{args.source}")]  # AdaLoRA from scratch first
    shown += [a for a in origins if a not in shown]
    rows = [arm_rows(arm, lrs_found[arm], found[arm], target_loss, grids[arm]) for arm in shown]
    reference = dict(zip(rows[0]["seeds"], rows[0]["steps_to_target"]))
    for row in rows[1:]:  # paired by seed, over the seeds both have
        pairs = [(s, reference[seed]) for seed, s in zip(row["seeds"], row["steps_to_target"]) if seed in reference]
        if len(pairs) >= 2:
            row["vs_adalora"] = paired_steps([a for a, _ in pairs], [b for _, b in pairs], budget)
    result = {"name": args.name, "config": {**vars(args), "source_lrs": SOURCE_LRS, "budget": budget, "grids": grids},
              "target_loss": target_loss, "rows": rows, "sweep": swept,
              "sources": {m: {"lr": r["lr"], "final_smoothed": r["final_smoothed"]} for m, r in sources.items()},
              "multitask_source": {a: o["final"] for a, o in origins.items() if "final" in o}}
    plot_curve_groups({arm: [r["losses"] for r in found[arm]] for arm in shown}, result_path(args.name),
                      f"{args.source} -> {args.target} / MiniLM: smoothed task loss, each arm at its best lr",
                      target=target_loss)
    write_results(args.name, result, render(result))
    return 0


def render(result: dict) -> list[str]:
    """The markdown of a transfer result."""
    header = ["arm", "lr", "lr inside grid", "seeds", "final loss (mean)", "dev metric (mean)", "steps to target",
              "steps / AdaLoRA's (mean)", "diff, 95% CI", "paired p", "never"]
    table = []
    for row in result["rows"]:
        vs = row.get("vs_adalora")
        steps = " / ".join("never" if s is None else str(s) for s in row["steps_to_target"])
        table.append([row["arm"], f"{row['lr']:g}", "yes" if row["lr_inside_grid"] else "**no (edge)**",
                      len(row["seeds"]), fmt(statistics.fmean(row["final_smoothed"])),
                      fmt(statistics.fmean(row["dev_metric"]), ".3f"), steps,
                      fmt(vs["mean_ratio"], ".2f") if vs else "1 (reference)",
                      f"{vs['diff_mean']:+.1f} [{vs['diff_ci'][0]:+.1f}, {vs['diff_ci'][1]:+.1f}]" if vs else "",
                      fmt(vs["p_value"], ".3g", "n/a") if vs else "", vs["never"] if vs else
                      sum(s is None for s in row["steps_to_target"])])
    sweep = [[s["arm"], f"{s['lr']:g}", fmt(s["final_smoothed"])] for s in result["sweep"]]
    return [f"Target loss: AdaLoRA-from-scratch's mean final smoothed loss at its best lr, "
            f"{result['target_loss']:.4f}; budget {result['config']['budget']} steps (a seed that never reaches "
            "it counts as budget + 1 in the paired test).", "",
            *markdown_table(header, table), "", "lr sweep (seed 0):", "",
            *markdown_table(["arm", "lr", "final smoothed loss"], sweep)]


__all__ = ["arms", "main", "multitask_label", "multitask_source", "paired_steps", "parse_args", "render"]
