"""Shared driver of the one-task variant studies (gamma sweep, body ablation, beyond the paper).

A study runs named variants of HyperAdaLoRA (or AdaLoRA) on one task / model with the protocol of
``convergence.py`` (same base config, steps, data order; runs cached in the same work dir, so a
variant identical to a convergence run is not run twice) and compares each with AdaLoRA: the
target is AdaLoRA's smoothed training loss at its last step at its best lr of the cached
convergence sweep (``--adalora-lr``). Every HyperAdaLoRA variant runs at one lr (``--lr``, default
1e-3), so that a variant differs from the default in one thing only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convergence as conv  # noqa: E402

from hyperadalora.bench.curves import best_lr, first_reach, mean_or_none  # noqa: E402
from hyperadalora.bench.report import fmt, markdown_table, plot_curve_groups, write_result  # noqa: E402
from hyperadalora.bench.runner import run_specs  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """A named variant: a method (``adalora`` / ``hyperadalora``) and its extra overrides."""

    label: str
    method: str = "hyperadalora"
    overrides: dict = field(default_factory=dict)
    tag: str = ""  # part of the cache key ("" = the convergence run itself)


def study_args(description: str, argv: list[str] | None, default_name: str, add_arguments=None) -> argparse.Namespace:
    """The common options of a study (``add_arguments(parser)`` adds the study's own)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if add_arguments is not None:
        add_arguments(p)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--task", default="sst2", choices=sorted(conv.TASKS))
    p.add_argument("--model", default="minilm", choices=sorted(conv.MODELS))
    p.add_argument("--lr", type=float, default=1e-3, help="the lr of every HyperAdaLoRA variant")
    p.add_argument("--adalora-lr", default="best", help="the AdaLoRA baseline's lr (its final loss is the target): "
                   "a number, or 'best': its best lr among the convergence sweep runs cached for the task")
    p.add_argument("--shared", choices=("run", "cached"), default="run",
                   help="the runs identical to convergence.py's (the baseline, the default variant): run them when "
                        "missing, or only read them from the cache (while convergence.py runs them)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default="runs/bench/convergence")
    p.add_argument("--name", default=default_name)
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def cached_best_adalora(args) -> float | None:
    """AdaLoRA's best lr among the cached seed-0 sweep runs of convergence.py on this task."""
    specs = [conv.spec(args.task, args.model, "adalora", lr, 0, conv.TASKS) for lr in conv.LRS]
    return best_lr(run_specs(specs, args.work_dir, args.data_dir, only_cached=True).values())


def run_study(args, variants: list[Variant], title: str, extra_columns=None) -> dict:
    """Runs the variants (and the AdaLoRA baseline) and writes ``results/<name>.*``.

    Args:
        args: From :func:`study_args`.
        variants: What to compare.
        title: The plot's title and the table's first line.
        extra_columns: ``{header: fn(result dict) -> str}`` extra table columns.
    """
    hyper_lr = args.lr  # one lr for every variant: they differ from the default in one thing only
    ada_lr = float(args.adalora_lr) if args.adalora_lr != "best" else (cached_best_adalora(args) or args.lr)
    baseline = [conv.spec(args.task, args.model, "adalora", ada_lr, s, conv.TASKS) for s in range(args.seeds)]
    specs = {v.label: [conv.spec(args.task, args.model, v.method, ada_lr if v.method == "adalora" else hyper_lr, s,
                                 conv.TASKS, extra=v.overrides, tag=v.tag) for s in range(args.seeds)]
             for v in variants}
    todo = baseline + [s for group in specs.values() for s in group]
    unique = list({s.key: s for s in todo}.values())
    # The baseline and the variants tagged "" are convergence.py's own runs (same keys, same overrides).
    shared = {s.key for s in baseline} | {s.key for v in variants if not v.tag for s in specs[v.label]}
    results = (run_specs([s for s in unique if s.key in shared], args.work_dir, args.data_dir, only_cached=True)
               if args.shared == "cached" else {})
    own = [s for s in unique if s.key not in results and not (args.shared == "cached" and s.key in shared)]
    results.update(run_specs(own, args.work_dir, args.data_dir, args.workers, args.threads,
                             only_cached=args.report_only))
    base_runs = [results[s.key] for s in baseline if s.key in results]
    target = statistics.mean(r["final_smoothed"] for r in base_runs) if base_runs else None
    rows, table, groups = [], [], {}
    extra_columns = extra_columns or {}
    for label, group in [("AdaLoRA (baseline)", baseline)] + list(specs.items()):
        runs = [results[s.key] for s in group if s.key in results]
        if not runs:
            continue
        reach = [first_reach(r["losses"], r["step_times"], target) if target is not None else (None, None)
                 for r in runs]
        accs = [(r["final_metrics"] or {}).get("accuracy") for r in runs]
        for r, (steps, secs), acc in zip(runs, reach, accs):
            rows.append({"variant": label, "key": r["key"], "seed": r["seed"], "lr": r["lr"],
                         "final_smoothed_loss": r["final_smoothed"], "target_loss": target,
                         "steps_to_target": steps, "seconds_to_target": secs, "dev_accuracy": acc,
                         "seconds_per_step": statistics.mean(r["step_times"]), "diverged": r["diverged"],
                         "final_regularizer": r["regularizer"][-1] if r["regularizer"] else None,
                         "final_total_rank": r["total_rank"][-1] if r["total_rank"] else None})
        finals = [r["final_smoothed"] for r in runs if r["final_smoothed"] is not None]
        table.append([label, f"{runs[0]['lr']:g}", len(runs), fmt(statistics.mean(finals) if finals else None),
                      fmt(mean_or_none(s for s, _ in reach), ".0f"), fmt(mean_or_none(t for _, t in reach), ".0f"),
                      f"{statistics.mean(statistics.mean(r['step_times']) for r in runs):.3f}",
                      fmt(mean_or_none(accs), ".3f", "n/a")]
                     + [fn(runs[0]) for fn in extra_columns.values()])
        groups[label] = [r["losses"] for r in runs]
    lines = [f"{title}: {args.task} / {args.model}, {conv.TASKS[args.task]['steps']} steps, batch 16; target "
             f"{fmt(target)} = AdaLoRA's final smoothed training loss at lr {ada_lr:g}.", "",
             *markdown_table(["variant", "lr", "seeds", "final loss", "steps to target", "s to target", "s/step",
                              "dev acc"] + list(extra_columns), table)]
    config = {"task": args.task, "model": args.model, "hyper_lr": hyper_lr, "adalora_lr": ada_lr,
              "seeds": args.seeds, "variants": [v.__dict__ for v in variants], "base": conv.BASE,
              "task_config": conv.TASKS[args.task], "workers": args.workers, "threads_per_run": args.threads}
    results_dir = conv.RESULTS
    write_result(results_dir, args.name, {"config": config, "rows": rows,
                                          "curves": {k: v for k, v in groups.items()}}, lines)
    plot_curve_groups(groups, results_dir / f"{args.name}.png", f"{title} ({args.task}, {args.model})",
                      target=target)
    print("\n".join(lines))
    return {"rows": rows, "target": target}
