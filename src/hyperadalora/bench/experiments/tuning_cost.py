"""Issue 20 item 1, the tuning cost: the compute to a tuned AdaLoRA's target *including* the lr search.

Reads committed ``tuned`` results and trains nothing. Per result, each method against AdaLoRA on
the *common ladder*, every lr that either one's seed-0 sweep ran:

* **good-lr window**: the lrs of the method's sweep whose final loss lies within 2% of its best
  (``tuned``'s ``TOLERANCE``). An lr of the ladder that the method did not run counts as outside
  its window. That is sound when both ends of the method's own grid lie outside the window (the
  loss rises away from the best lr on either side); where an end is inside, the window may be
  wider than counted and the row says ``open``.
* **random search**: lrs of the ladder tried in random order, without replacement, until one lands
  in the window: ``(N + 1) / (K + 1)`` tries on average (``N`` lrs, ``K`` good). Its compute, in
  AdaLoRA steps: the failed tries run to the end (``steps`` each), the good one to the target:
  ``((N + 1) / (K + 1) - 1) * steps * cost + steps_to_target * cost``, ``cost`` being the method's
  interleaved step cost relative to AdaLoRA's.
* **grid search**: every lr of the ladder, then the best: ``N * steps * cost``; its ratio to
  AdaLoRA's is the step cost ratio, whatever the windows.

A wider window pays only where it saves more tries than the step costs more.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..curves import MEASURES, measure_of
from ..experiment import Command, experiment
from ..paths import results_dir
from ..report import fmt, markdown_table
from .common import write_results
from .tuned import BASELINE
from .tuned_report import TOLERANCE

DEFAULT_RESULTS = "tuned_5seeds,tuned_mpnet,tuned_rte_mpnet,tuned_alpaca_smollm2,tuned_alpaca_heldout"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of :func:`main`."""
    p = argparse.ArgumentParser(prog="hyperadalora bench tuning_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=DEFAULT_RESULTS, help="comma-separated tuned result names "
                   "(benchmarks/results/<name>.json)")
    p.add_argument("--name", default="tuning_cost")
    args = p.parse_args(argv)
    args.result_list = [x for x in args.results.split(",") if x]
    missing = [x for x in args.result_list if not (results_dir() / f"{x}.json").is_file()]
    if missing or not args.result_list:
        p.error(f"--results {args.results!r}: no result file for {missing} in {results_dir()} (run `hyperadalora "
                "bench tuned ... --name NAME` first, or name committed ones such as tuned_5seeds)")
    return args


def expected_tries(ladder: int, good: int) -> float | None:
    """Mean tries of a random-order search without replacement until the first good lr
    (``None`` when no lr is good): ``(ladder + 1) / (good + 1)``."""
    return (ladder + 1) / (good + 1) if good else None


def method_row(result: dict, method: str, ladder: list[float]) -> dict:
    """The tuning cost of ``method`` in ``result`` on the common ``ladder`` (see the module docstring)."""
    s = result["summary"][method]
    window = [lr for lr in s["good_lr_window"] if lr in ladder]
    grid = sorted(s["grid"])
    steps = result["config"]["steps"]
    cost = s["step_ratio_to_adalora"]
    tries = expected_tries(len(ladder), len(window))
    reached, n = s["steps_to_target"]["reached"], s["n"]
    to_target = s["steps_to_target"]["mean"]
    random = None if tries is None or cost is None or to_target is None else (
        (tries - 1) * steps * cost + to_target * cost)
    return {"result": result["name"], "task": result["config"]["task"], "model": result["config"]["model"],
            "measure": measure_of(result["config"]).name, "method": method,
            "label": result["config"]["labels"][method], "ladder": len(ladder),
            "window": window, "open": grid[0] in window or grid[-1] in window, "tries": tries,
            "step_cost": cost, "steps": steps, "steps_to_target": to_target, "reached": reached, "seeds": n,
            "random_search_steps": random, "grid_search_steps": None if cost is None else len(ladder) * steps * cost}


def rows_of(result: dict) -> list[dict]:
    """One row per method of a tuned result but AdaLoRA: the method and AdaLoRA on their common
    ladder, and the method's compute over AdaLoRA's."""
    base_grid = set(result["summary"][BASELINE]["grid"])
    rows = []
    for method, s in result["summary"].items():
        if method == BASELINE:
            continue
        ladder = sorted(base_grid | set(s["grid"]))
        row, base = method_row(result, method, ladder), method_row(result, BASELINE, ladder)
        row["adalora"] = {k: base[k] for k in ("window", "open", "tries", "steps_to_target", "reached", "seeds",
                                               "random_search_steps", "grid_search_steps")}
        for key in ("random_search_steps", "grid_search_steps"):
            row[key.replace("_steps", "_ratio")] = (row[key] / base[key] if row[key] is not None and base[key]
                                                    else None)
        rows.append(row)
    return rows


def _window(entry: dict) -> str:
    return (", ".join(f"{lr:g}" for lr in entry["window"]) or "none") + (" (open)" if entry["open"] else "")


def _reached(entry: dict) -> str:
    return f"{fmt(entry['steps_to_target'], '.0f', 'never')} ({entry['reached']}/{entry['seeds']})"


def _search(entry: dict) -> str:
    """Random search's compute; ``>=`` where some seeds never reached the target (the mean is over those that did)."""
    text = fmt(entry["random_search_steps"], ".0f", "never")
    return f">= {text}" if entry["random_search_steps"] is not None and entry["reached"] < entry["seeds"] else text


def render(result: dict) -> list[str]:
    """The table of a ``tuning_cost`` result."""
    table = []
    for r in result["rows"]:
        a = r["adalora"]
        task = f"{r['task']} / {r['model']}{MEASURES[r['measure']].row_tag}"
        table.append([task, r["label"], str(r["ladder"]), _window(r), _window(a),
                      f"{fmt(r['tries'], '.2f', 'n/a')} / {fmt(a['tries'], '.2f', 'n/a')}",
                      fmt(r["step_cost"], ".2f", "n/a"), f"{_reached(r)} / {_reached(a)}",
                      f"{_search(r)} / {_search(a)}",
                      fmt(r["random_search_ratio"], ".2f", "n/a"), fmt(r["grid_search_ratio"], ".2f", "n/a")])
    intro = ("Tuning cost (issue 20 item 1), from the committed tuned results "
             f"({', '.join(result['config']['results'])}); each method against AdaLoRA on their common ladder (the "
             "lrs either one's seed-0 sweep ran; an lr a method did not run counts as outside its window); compute "
             "in AdaLoRA steps. Window: the lrs within 2% of the method's best final loss (smoothed training loss; the "
             "held-out loss of the evaluation rows where marked `held-out`) (`open`: an end of its grid is in it, "
             "so it may be wider); tries: mean lrs a random-order search runs until one is in the "
             "window, (N+1)/(K+1); random search = (tries - 1) x steps x cost + steps to target x cost (mean over "
             "the seeds that reached the target; `>=` where some never did); grid search = N x steps x cost, so its "
             "ratio is the step cost's.")
    header = ["task / model", "method", "ladder lrs", "window", "AdaLoRA's window", "tries (/ AdaLoRA's)",
              "step cost", "steps to target (/ AdaLoRA's)", "random search (/ AdaLoRA's)", "random / AdaLoRA",
              "grid / AdaLoRA"]
    return [intro, "", *markdown_table(header, table)]


@experiment("tuning_cost", section="## 10. Sensitivity-LoRA side by side, each method at its own best lr (issues 18, 20)",
            title="10j. tuning cost: compute to the target including the lr search (from the tuned results)",
            parse_args=parse_args, render=render, data=False, commands=[Command("tuning_cost")])
def main(argv: list[str] | None = None) -> int:
    """Reads the tuned results and writes ``results/<name>.*``."""
    args = parse_args(argv)
    rows = []
    for name in args.result_list:
        result = json.loads(Path(results_dir() / f"{name}.json").read_text())
        rows += rows_of({**result, "name": name})
    result = {"config": {"results": args.result_list, "tolerance": TOLERANCE}, "rows": rows}
    lines = render(result)
    write_results(args.name, result, lines)
    print("\n".join(lines))
    return 0
