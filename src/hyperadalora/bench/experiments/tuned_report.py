"""The ``tuned`` experiment's result: rows (the convergence schema), per-method summaries with
95% t intervals and paired tests against AdaLoRA, the sweep with good-lr windows, and the table.

:func:`render` is a pure function of the result JSON (``hyperadalora bench render`` rebuilds the
table from it); :func:`summarize` computes the statistics once, when the result is built.
"""

from __future__ import annotations

import statistics

from ..curves import MEASURES, TrainingLoss, measure_of
from ..report import fmt, markdown_table, plot_curve_groups
from ..stats import good_lr_window, mean_ci, paired_test, verdict
from .common import result_path

TOLERANCE = 0.02  # the good-lr window: final loss within 2% of the method's best


def rows_of(runs: list[dict], task: str, model: str, best: dict, metric: str,
            measure: TrainingLoss = MEASURES["training"]) -> list[dict]:
    """One row per seed of each method at its best lr, against AdaLoRA's target (``[]`` without one).

    The target is AdaLoRA's final ``measure`` (the smoothed training loss unless told otherwise),
    mean over its seeds; ``seconds_to_target`` is the run's own wall time (as :mod:`.convergence`
    has it); the table uses the interleaved cost. ``final_loss`` is the row's final ``measure``,
    ``final_smoothed_loss`` its smoothed training loss whatever the measure.
    """
    mine = {m: sorted((r for r in runs if r["tags"]["method"] == m and best[m] is not None
                       and abs(r["lr"] - best[m]) < 1e-12), key=lambda r: r["seed"]) for m in best}
    finals = {id(r): None if r["diverged"] or r["final_smoothed"] is None else measure.final(r)
              for group in mine.values() for r in group}
    base = [finals[id(r)] for r in mine.get("adalora", []) if finals[id(r)] is not None]
    if not base:
        return []
    target = statistics.mean(base)
    rows = []
    for m, group in mine.items():
        for r in group:
            steps, secs = measure.reach(r, target)
            rows.append({"task": task, "model": model, "method": m, "seed": r["seed"], "lr": r["lr"],
                         "lr_setting": "own_best_lr", "target_loss": target, "steps_to_target": steps,
                         "seconds_to_target": secs, "dev_accuracy": (r["final_metrics"] or {}).get("accuracy"),
                         "dev_metric": (r["final_metrics"] or {}).get(metric), "metric": metric,
                         "final_smoothed_loss": r["final_smoothed"], "final_loss": finals[id(r)],
                         "steps": len(r["losses"]), "calibration_s": (r.get("allocation") or {}).get("seconds"),
                         "seconds_per_step": statistics.mean(r["step_times"]) if r["step_times"] else None})
    return rows


def _by_seed(rows: list[dict], method: str, key: str) -> dict[int, float]:
    return {r["seed"]: r[key] for r in rows if r["method"] == method and r[key] is not None}


def _ci(values) -> dict:
    mean, half = mean_ci(list(values))
    return {"mean": mean, "ci95": half}


def _test(rows: list[dict], method: str, key: str, higher_is_better: bool) -> dict | None:
    test = paired_test(_by_seed(rows, method, key), _by_seed(rows, "adalora", key))
    return None if test is None else {"n": test.n, "mean_diff": test.mean_diff, "t": test.t, "p": test.p,
                                      "verdict": verdict(test, higher_is_better)}


def final_loss(entry: dict) -> float | None:
    """A row's or sweep entry's final loss as its result compares them: the target measure's
    (``final_loss``), or the smoothed training loss in results written before measures existed."""
    return entry["final_loss"] if "final_loss" in entry else entry["final_smoothed_loss"]


def summarize(rows: list[dict], sweep: list[dict], grids: dict, cost: dict) -> dict:
    """Per method: seeds, means with 95% t intervals, paired tests against AdaLoRA, interleaved
    time to target and in all, memory, the sweep's best lr, whether it is inside the grid, the good-lr window."""
    out = {}
    ada_cost = (cost.get("adalora") or {}).get("step_s")
    for m in grids:
        grid = sorted(s["lr"] for s in sweep if s["method"] == m)  # the lrs that ran
        mine = [r for r in rows if r["method"] == m]
        reached = [r["steps_to_target"] for r in mine if r["steps_to_target"] is not None]
        calib = [r["calibration_s"] for r in mine if r["calibration_s"] is not None]
        c = cost.get(m) or {}
        step_s = c.get("step_s")
        calib_mean = statistics.mean(calib) if calib else 0.0
        steps_mean = statistics.mean(reached) if reached else None
        finals = {s["lr"]: final_loss(s) for s in sweep if s["method"] == m}
        best = next((s["lr"] for s in sweep if s["method"] == m and s["best"]), None)
        total = (mine[0]["steps"] * step_s + calib_mean) if mine and step_s else None
        out[m] = {
            "n": len(mine), "lr": best, "grid": grid,
            "best_inside_grid": best is not None and min(grid) < best < max(grid),
            "good_lr_window": good_lr_window(finals, TOLERANCE),
            "final_loss": _ci(final_loss(r) for r in mine if final_loss(r) is not None),
            "dev_metric": _ci(r["dev_metric"] for r in mine if r["dev_metric"] is not None),
            "steps_to_target": {**_ci(reached), "reached": len(reached)},
            "calibration_s": calib_mean if calib else None, "step_s": step_s,
            "step_ratio_to_adalora": step_s / ada_cost if step_s and ada_cost else None,
            "time_to_target_s": steps_mean * step_s + calib_mean if steps_mean is not None and step_s else None,
            "total_time_s": total, "peak_mib": c.get("peak_mib"), "trainable": c.get("trainable"),
            "vs_adalora": None if m == "adalora" else {
                "dev_metric": _test(rows, m, "dev_metric", True),
                "final_loss": _test([{**r, "final_loss": final_loss(r)} for r in rows], m, "final_loss", False),
                "steps_to_target": _test(rows, m, "steps_to_target", False)},
        }
    return out


def _pm(stat: dict, spec: str) -> str:
    if stat["mean"] is None:
        return "n/a"
    return format(stat["mean"], spec) + ("" if stat["ci95"] is None else f" ± {format(stat['ci95'], spec)}")


def _p(test: dict | None, spec: str) -> str:
    if test is None:
        return "n/a"
    return f"{test['mean_diff']:+{spec}} (n {test['n']}, p {test['p']:.3g}) {test['verdict']}"


MAIN_HEADER = ["method", "best lr (grid)", "seeds", "final loss", "{split} {metric}", "steps to target (reached)",
               "step cost / AdaLoRA", "time to target s", "total s (/ AdaLoRA)", "calibration s", "peak MiB",
               "trainable"]


def main_table(result: dict) -> list[str]:
    """Each method at its best lr: means ± 95% t half-widths, interleaved costs, memory."""
    summary, labels, metric = result["summary"], result["config"]["labels"], result["config"]["metric"]
    ada_total = (summary.get("adalora") or {}).get("total_time_s")
    table = []
    for m, s in summary.items():
        grid = ", ".join(f"{x:g}" for x in s["grid"])
        total = fmt(s["total_time_s"], ".0f", "n/a")
        if s["total_time_s"] and ada_total:
            total += f" ({s['total_time_s'] / ada_total:.2f})"
        table.append([labels[m], f"{fmt(s['lr'], 'g', 'n/a')} ({grid}){'' if s['best_inside_grid'] else ' edge'}",
                      str(s["n"]), _pm(s["final_loss"], ".4f"), _pm(s["dev_metric"], ".4f"),
                      f"{_pm(s['steps_to_target'], '.0f')} ({s['steps_to_target']['reached']}/{s['n']})",
                      fmt(s["step_ratio_to_adalora"], ".2f", "n/a"),
                      # "never" only when no seed reached the target; without a step cost it is unknown
                      fmt(s["time_to_target_s"], ".1f", "never" if not s["steps_to_target"]["reached"] else "n/a"),
                      total, fmt(s["calibration_s"], ".2f", "-"), fmt(s["peak_mib"], ".0f", "n/a"),
                      fmt(s["trainable"], ",", "n/a")])
    split = result["config"].get("eval_split", "dev")  # results before the instruction task: GLUE dev
    return markdown_table([h.format(metric=metric, split=split) for h in MAIN_HEADER], table)


def tests_table(result: dict) -> list[str]:
    """Paired t tests against AdaLoRA (paired by seed): mean difference, pairs, p, verdict."""
    metric, labels = result["config"]["metric"], result["config"]["labels"]
    table = [[labels[m], _p(s["vs_adalora"]["dev_metric"], ".4f"), _p(s["vs_adalora"]["final_loss"], ".4f"),
              _p(s["vs_adalora"]["steps_to_target"], ".1f")]
             for m, s in result["summary"].items() if s["vs_adalora"] is not None]
    split = result["config"].get("eval_split", "dev")
    return markdown_table(["method - AdaLoRA", f"{split} {metric}", "final loss", "steps to target"], table)


def sweep_table(result: dict) -> list[str]:
    """Seed-0 final smoothed loss per method and lr; ``*`` best, ``w`` in the good-lr window."""
    lrs = sorted({s["lr"] for s in result["sweep"]})
    labels, summary = result["config"]["labels"], result["summary"]
    cells = {(s["method"], s["lr"]): s for s in result["sweep"]}

    def cell(m: str, lr: float) -> str:
        s = cells.get((m, lr))
        if s is None:
            return ""
        mark = (" *" if s["best"] else "") + (" w" if lr in summary[m]["good_lr_window"] else "")
        return ("diverged" if s["diverged"] else fmt(final_loss(s))) + mark

    table = [[labels[m], *(cell(m, lr) for lr in lrs), str(len(summary[m]["good_lr_window"]))] for m in summary]
    return markdown_table(["method", *(f"{lr:g}" for lr in lrs), "good-lr window (lrs)"], table)


def render(result: dict) -> list[str]:
    """The markdown of a ``tuned`` result."""
    c = result["config"]
    measure = measure_of(c)
    loss, target = measure.wording(c)
    intro = (f"{c['task']} / {c['model']}, {c['steps']} steps x batch {c['batch_size']}; each method at its own best lr "
             f"(seed-0 sweep, lowest final {measure.label}). Means ± 95% t half-widths over seeds. Target: "
             f"{target}, mean over its seeds ({fmt(c['target_loss'])}); steps to target: mean over "
             "the seeds that reached it. Time = steps x the method's interleaved step time (median of "
             f"{c['cost_steps']} round-robin steps, {c['cost_seq_len']}-token rows) + calibration; total = all steps. "
             "Peak MiB: resident growth over 3 steps in a fresh process. `edge`: the best lr is at an end of the grid.")
    return [intro, "", *main_table(result), "",
            "Paired t tests against AdaLoRA (same seeds; method minus AdaLoRA; a verdict only where p < 0.05):", "",
            *tests_table(result), "",
            (f"Learning-rate sweep (seed 0): final {loss}; `*` best, `w` within {TOLERANCE:.0%} of "
             "the best (the good-lr window)"), "", *sweep_table(result)]


def plot(result: dict, name: str) -> None:
    """``<name>.png``: each method's smoothed loss at its best lr, mean and min-max over seeds; with the
    held-out measure a second panel holds the held-out loss and the target."""
    labels = result["config"]["labels"]
    groups: dict[str, list] = {}
    eval_curves: dict[str, list] = {}
    for row in result["rows"]:
        curve = next(c for c in result["curves"] if c["method"] == row["method"]
                     and c["seed"] == row["seed"] and abs(c["lr"] - row["lr"]) < 1e-12)
        label = f"{labels[row['method']]} lr {row['lr']:g}"
        groups.setdefault(label, []).append(curve["losses"])
        if curve.get("eval_losses"):
            eval_curves.setdefault(label, []).append(curve["eval_losses"])
    if not groups:
        return
    target = result["rows"][0]["target_loss"]
    title = f"{result['config']['task']} / {result['config']['model']}: each method at its best lr"
    panel = measure_of(result["config"]).panel
    if panel is None:
        plot_curve_groups(groups, result_path(name), title, target=target)
        return
    plot_curve_groups({}, result_path(name), title, target={panel: target}, ylabel="loss",
                      panels={"training loss (smoothed)": groups, panel: eval_curves}, points={panel})
