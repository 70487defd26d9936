"""``make demo``: AdaLoRA vs HyperAdaLoRA on the packaged MiniLM with real GLUE SST-2 rows.

Trains all-MiniLM-L6-v2 twice with the ``sst2_minilm_adalora`` preset (250 steps at batch 16,
at most 64 tokens, AdaLoRA r=12 -> 8 on every encoder linear layer): once as it is, once with
``adapter.source=hyper`` (HyperAdaLoRA, at :class:`~hyperadalora.HyperConfig`'s defaults).
Same seed, same data order, same schedule. Each run is an ordinary ``hyperadalora train`` run
directory; the demo then prints a side-by-side table (smoothed training task loss at fixed
steps, dev accuracy on the 872 real SST-2 dev rows, step time, final rank) and writes the
overlaid loss curves.

Usage::

    python -m hyperadalora.demo --data-dir ../shared/data [--out runs/demo] [steps=100 ...]

Writes ``<out>/adalora/``, ``<out>/hyperadalora/`` (run directories), ``<out>/loss_overlay.png``,
``<out>/summary.json`` and ``<out>/summary.md``. Extra ``key=value`` items override both runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .train import NonFiniteLossError, RunResult, load_run_config, train
from .train.plots import plot_loss_overlay, smooth

PRESET = "sst2_minilm_adalora"
VARIANTS = (("AdaLoRA", "adalora", []), ("HyperAdaLoRA", "hyperadalora", ["adapter.source=hyper"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hyperadalora.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="directory with sst2/train.tsv and sst2/dev.tsv "
                                                    "(else $HYPERADALORA_DATA_DIR)")
    p.add_argument("--out", default=None, help="output folder (default: runs/demo-<time>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for both runs (e.g. steps=100)")
    return p.parse_args(argv)


def checkpoints(steps: int, n: int = 6) -> list[int]:
    """``n`` evenly spaced report steps from 1 to ``steps`` (250 -> 1, 50, 100, 150, 200, 250)."""
    return sorted({1, *(max(1, round(steps * i / (n - 1))) for i in range(1, n))})


def summarize(results: dict[str, RunResult], at: list[int]) -> tuple[list[str], dict]:
    """The side-by-side table (lines) and its numbers."""
    names = list(results)
    cols = {}
    for name, r in results.items():
        task = smooth([row["task_loss"] for row in r.log])
        times = [row["step_time"] for row in r.log]
        cols[name] = {
            "task_loss_smoothed": {s: task[s - 1] for s in at if s <= len(task)},
            "dev_accuracy": (r.final_metrics or {}).get("accuracy"),
            "dev_rows": (r.final_metrics or {}).get("num_examples"),
            "mean_step_time": sum(times) / len(times) if times else None,
            "train_seconds": sum(times),
            "final_total_rank": r.log[-1]["total_rank"] if r.log else None,
            "run_dir": str(r.run_dir),
            "status": r.status,
        }
    width = 30
    lines = [f"{'':<{width}}" + "".join(f"{n:>14}" for n in names)]
    for s in at:
        lines.append(f"{f'task loss (smoothed) @ {s}':<{width}}"
                     + "".join(f"{cols[n]['task_loss_smoothed'].get(s, float('nan')):>14.4f}" for n in names))
    fmt = {"dev_accuracy": ("dev accuracy ({} rows)", "{:>14.4f}"),
           "mean_step_time": ("step time (s, mean)", "{:>14.3f}"),
           "train_seconds": ("training time (s)", "{:>14.1f}"), "final_total_rank": ("final total rank", "{:>14d}")}
    for key, (label, spec) in fmt.items():
        label = label.format(cols[names[0]]["dev_rows"])
        lines.append(f"{label:<{width}}" + "".join(
            spec.format(cols[n][key]) if cols[n][key] is not None else f"{'-':>14}" for n in names))
    if any(cols[n]["status"] != "completed" for n in names):
        lines.append(f"{'status':<{width}}" + "".join(f"{cols[n]['status'].split(':')[0]:>14}" for n in names))
    return lines, cols


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    common = [*args.overrides, f"output_dir={out}"]
    if args.data_dir is not None:
        common.append(f"data_dir={args.data_dir}")
    if args.no_progress:
        common.append("progress=false")
    configs = {label: load_run_config(PRESET, [*common, *extra, f"run_name={name}"]) for label, name, extra in VARIANTS}
    first = next(iter(configs.values()))
    print(f"hyperadalora demo: {first.task} on {first.model}, {first.steps} steps x batch {first.batch_size} "
          f"(<= {first.max_length} tokens), lr {first.lr:g}, seed {first.seed}, same data order; "
          f"AdaLoRA r={first.adapter.r} -> target_r={first.adapter.allocator.target_r} vs HyperAdaLoRA "
          f"(hyper: {first.adapter.hyper.arch}/{first.adapter.hyper.tokens}/{first.adapter.hyper.mode}); "
          f"output in {out}", file=sys.stderr, flush=True)
    results = {}
    for label, config in configs.items():
        print(f"\n== {label} ==", file=sys.stderr, flush=True)
        try:
            results[label] = train(config)
        except NonFiniteLossError as exc:  # the table still shows the steps it made
            print(f"hyperadalora demo: {label}: {exc}", file=sys.stderr, flush=True)
            results[label] = exc.result
    at = checkpoints(first.steps)
    lines, cols = summarize(results, at)
    curves = {label: ([row["step"] for row in r.log], [row["task_loss"] for row in r.log])
              for label, r in results.items()}
    title = f"{first.task} / {first.model}: AdaLoRA vs HyperAdaLoRA (seed {first.seed}, same data order)"
    plot_loss_overlay(curves, out / "loss_overlay.png", title)
    wall = time.perf_counter() - started
    header = (f"SST-2 on MiniLM, {first.steps} steps x batch {first.batch_size} (<= {first.max_length} tokens), "
              f"seed {first.seed}, same data order; wall time {wall:.0f} s")
    (out / "summary.md").write_text("\n".join([header, "", "```", *lines, "```", ""]))
    (out / "summary.json").write_text(json.dumps({"header": header, "runs": cols, "wall_seconds": wall,
                                                  "config": first.to_dict()}, indent=1, default=str) + "\n")
    print("\n" + header)
    print("\n".join(lines))
    print(f"loss curves: {out / 'loss_overlay.png'}; run directories: "
          + ", ".join(str(r.run_dir) for r in results.values()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"hyperadalora demo: error: {exc}", file=sys.stderr)
        sys.exit(2)
