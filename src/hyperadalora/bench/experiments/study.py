"""Shared driver of the one-task variant studies (gamma sweep, body ablation, beyond the paper).

A study runs named variants of HyperAdaLoRA (or AdaLoRA) on one task / model with the protocol of
the convergence experiment (same base config, steps, data order; runs cached in the same work
dir, so a variant identical to a convergence run is not run twice) and compares each with AdaLoRA:
the target is AdaLoRA's smoothed training loss at its last step at its best lr of the cached
convergence sweep (``--adalora-lr``). Every HyperAdaLoRA variant runs at one lr (``--lr``, default
1e-3), so that a variant differs from the default in one thing only.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..curves import best_lr, first_reach, mean_or_none
from ..report import fmt, markdown_table, plot_curve_groups
from ..runner import RunSpec, run_specs
from . import convergence as conv
from .common import result_path, write_results

BASELINE = "AdaLoRA (baseline)"


@dataclass(frozen=True)
class Variant:
    """A named variant: a method (``adalora`` / ``hyperadalora``) and its extra overrides."""

    label: str
    method: str = "hyperadalora"
    overrides: dict = field(default_factory=dict)
    tag: str = ""  # part of the cache key ("" = the convergence run itself)


def study_args(name: str, description: str, argv: list[str] | None,
               add_arguments: Callable | None = None) -> argparse.Namespace:
    """The common options of a study (``add_arguments(parser)`` adds the study's own)."""
    p = argparse.ArgumentParser(prog=f"hyperadalora bench {name}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if add_arguments is not None:
        add_arguments(p)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--task", default="sst2", choices=sorted(conv.TASKS))
    p.add_argument("--model", default="minilm", choices=sorted(conv.MODELS))
    p.add_argument("--lr", type=float, default=1e-3, help="the lr of every HyperAdaLoRA variant")
    p.add_argument("--adalora-lr", default="best", help="the AdaLoRA baseline's lr (its final loss is the target): "
                   "a number, or 'best': its best lr among the convergence sweep runs cached for the task")
    p.add_argument("--shared", choices=("run", "cached"), default="run",
                   help="the runs identical to the convergence experiment's (the baseline, the default variant): "
                        "run them when missing, or only read them from the cache (while convergence runs them)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default="runs/bench/convergence")
    p.add_argument("--name", default=name)
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def baseline_lr(args: argparse.Namespace) -> float:
    """The AdaLoRA baseline's lr: ``--adalora-lr``, or its cached best, or (said aloud) ``--lr``."""
    if args.adalora_lr != "best":
        return float(args.adalora_lr)
    best = cached_best_adalora(args)
    if best is None:
        print(f"{args.name}: no convergence sweep runs cached in {args.work_dir}, so the AdaLoRA baseline (the "
              f"target) runs at --lr {args.lr:g}; pass --adalora-lr to pin it", flush=True)
        return args.lr
    return best


def cached_best_adalora(args: argparse.Namespace) -> float | None:
    """AdaLoRA's best lr among the cached seed-0 sweep runs of the convergence experiment on this task."""
    specs = [conv.spec(args.task, args.model, "adalora", lr, 0, conv.TASKS) for lr in conv.LRS]
    return best_lr(run_specs(specs, args.work_dir, args.data_dir, only_cached=True).values())


def study_specs(args: argparse.Namespace, variants: list[Variant], ada_lr: float) -> dict[str, list[RunSpec]]:
    """``{label: the runs of its seeds}``, the AdaLoRA baseline first."""
    def runs(method: str, lr: float, overrides: dict, tag: str) -> list[RunSpec]:
        return [conv.spec(args.task, args.model, method, lr, s, conv.TASKS, extra=overrides, tag=tag)
                for s in range(args.seeds)]

    return {BASELINE: runs("adalora", ada_lr, {}, ""),
            **{v.label: runs(v.method, ada_lr if v.method == "adalora" else args.lr, v.overrides, v.tag)
               for v in variants}}


def run_study_specs(args: argparse.Namespace, specs: dict[str, list[RunSpec]], variants: list[Variant]) -> dict:
    """Runs (or reads) every spec; the convergence runs only from the cache with ``--shared cached``."""
    unique = list({s.key: s for group in specs.values() for s in group}.values())
    # The baseline and the variants tagged "" are the convergence experiment's own runs (same keys, overrides).
    shared = {s.key for s in specs[BASELINE]} | {s.key for v in variants if not v.tag for s in specs[v.label]}
    results = (run_specs([s for s in unique if s.key in shared], args.work_dir, args.data_dir, only_cached=True)
               if args.shared == "cached" else {})
    own = [s for s in unique if s.key not in results and not (args.shared == "cached" and s.key in shared)]
    results.update(run_specs(own, args.work_dir, args.data_dir, args.workers, args.threads,
                             only_cached=args.report_only))
    return results


def run_study(args: argparse.Namespace, variants: list[Variant], title: str,
              render_result: Callable[[dict], list[str]], config: dict | None = None) -> dict:
    """Runs the variants (and the AdaLoRA baseline) and writes ``results/<name>.*``.

    Args:
        args: From :func:`study_args`.
        variants: What to compare.
        title: The plot's title.
        render_result: The study's registered ``render`` (the table, from the result alone).
        config: More entries of the result's ``config``.

    Returns:
        The result (``rows``, ``curves``, ``config``).
    """
    ada_lr = baseline_lr(args)
    specs = study_specs(args, variants, ada_lr)
    results = run_study_specs(args, specs, variants)
    base_runs = [results[s.key] for s in specs[BASELINE] if s.key in results]
    target = statistics.mean(r["final_smoothed"] for r in base_runs) if base_runs else None
    rows, groups = [], {}
    for label, group in specs.items():
        runs = [results[s.key] for s in group if s.key in results]
        rows += [study_row(label, r, target) for r in runs]
        if runs:
            groups[label] = [r["losses"] for r in runs]
    result = {"config": {"task": args.task, "model": args.model, "hyper_lr": args.lr, "adalora_lr": ada_lr,
                         "seeds": args.seeds, "variants": [v.__dict__ for v in variants], "base": conv.BASE,
                         "task_config": conv.TASKS[args.task], "workers": args.workers,
                         "threads_per_run": args.threads, **(config or {})},
              "rows": rows, "curves": groups}
    lines = render_result(result)
    write_results(args.name, result, lines)
    plot_curve_groups(groups, result_path(args.name), f"{title} ({args.task}, {args.model})", target=target)
    print("\n".join(lines))
    return result


def study_row(label: str, r: dict, target: float | None) -> dict:
    """The result row of one cached run against the target."""
    steps, secs = first_reach(r["losses"], r["step_times"], target) if target is not None else (None, None)
    return {"variant": label, "key": r["key"], "seed": r["seed"], "lr": r["lr"],
           "final_smoothed_loss": r["final_smoothed"], "target_loss": target,
           "steps_to_target": steps, "seconds_to_target": secs,
           "dev_accuracy": (r["final_metrics"] or {}).get("accuracy"),
           "seconds_per_step": statistics.mean(r["step_times"]), "diverged": r["diverged"],
           "final_regularizer": r["regularizer"][-1] if r["regularizer"] else None,
           "final_total_rank": r["total_rank"][-1] if r["total_rank"] else None}


def render(result: dict, title: str, extra_headers: Sequence[str] = (),
           extra_cells: Callable[[list[dict]], list[str]] | None = None) -> list[str]:
    """The markdown of a study: one line per variant (means over its seeds).

    Args:
        result: The result JSON.
        title: The table's first words.
        extra_headers: Headers of the study's own columns.
        extra_cells: ``fn(the variant's rows) -> cells`` of those columns.
    """
    cfg = result["config"]
    groups: dict[str, list[dict]] = {}
    for row in result["rows"]:
        groups.setdefault(row["variant"], []).append(row)
    table = []
    for label, rows in groups.items():
        finals = [r["final_smoothed_loss"] for r in rows if r["final_smoothed_loss"] is not None]
        table.append([label, f"{rows[0]['lr']:g}", len(rows), fmt(statistics.mean(finals) if finals else None),
                      fmt(mean_or_none(r["steps_to_target"] for r in rows), ".0f"),
                      fmt(mean_or_none(r["seconds_to_target"] for r in rows), ".0f"),
                      f"{statistics.mean(r['seconds_per_step'] for r in rows):.3f}",
                      fmt(mean_or_none(r["dev_accuracy"] for r in rows), ".3f", "n/a"),
                      *(extra_cells(rows) if extra_cells else [])])
    target = result["rows"][0]["target_loss"] if result["rows"] else None
    return [f"{title}: {cfg['task']} / {cfg['model']}, {cfg['task_config']['steps']} steps, batch 16; target "
            f"{fmt(target)} = AdaLoRA's final smoothed training loss at lr {cfg['adalora_lr']:g}.", "",
            *markdown_table(["variant", "lr", "seeds", "final loss", "steps to target", "s to target", "s/step",
                             "dev acc", *extra_headers], table)]
