"""Result records of the benchmarks: machine and versions, JSON + markdown files, plots."""

from __future__ import annotations

import importlib
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

from ..train.plots import pyplot, smooth
from .curves import mean_and_spread


def machine() -> dict:
    """What the numbers were measured on (CPU count, load, torch threads, accelerator)."""
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        pass
    return info


def versions() -> dict:
    """Library versions that matter for the figures."""
    import torch
    import transformers

    from .. import __version__

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "hyperadalora": __version__}
    for name in ("peft", "bitsandbytes"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            pass
    return out


def fmt(value, spec: str = ".4f", none: str = "never") -> str:
    """``format(value, spec)``, or ``none`` for ``None``."""
    return none if value is None else format(value, spec)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """A GitHub markdown table (cells already formatted as strings)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_result(results_dir: str | Path, name: str, result: dict, lines: Sequence[str]) -> Path:
    """Writes ``<name>.json`` (with machine and versions added) and ``<name>.md``; returns the JSON path."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    result = {"name": name, "machine": machine(), "versions": versions(), **result}
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    (results_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    return path


def plot_curve_groups(groups: dict[str, list[list[float]]], path: str | Path, title: str,
                      target: float | dict[str, float] | None = None, ylabel: str = "training loss (smoothed)",
                      panels: dict[str, dict[str, list]] | None = None, points: set[str] = frozenset()) -> Path:
    """Smoothed loss curves, the mean over seeds as a line and the min-max spread as a band.

    Args:
        groups: ``{label: [losses of seed 0, losses of seed 1, ...]}`` (one panel), or use ``panels``.
        path: The PNG to write.
        title: Figure title.
        target: A horizontal line (the target loss) when given; a dict gives one per panel title.
        ylabel: Y axis label.
        panels: ``{panel title: groups}`` for several panels side by side (``groups`` ignored).
        points: Titles of the panels whose curves are ``[step, value]`` pairs (a held-out loss
            taken every N steps), drawn unsmoothed at their steps.
    """
    plt = pyplot()
    panels = panels or {title: groups}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), dpi=110, squeeze=False)
    for ax, (ptitle, pgroups) in zip(axes[0], panels.items()):
        for label, curves in pgroups.items():
            if ptitle in points:
                steps = [s for s, _ in curves[0]][:min(len(c) for c in curves)]
                mean, low, high = mean_and_spread([[v for _, v in c] for c in curves])
            else:
                mean, low, high = mean_and_spread([smooth(c) for c in curves])
                steps = range(1, len(mean) + 1)
            (line,) = ax.plot(steps, mean, linewidth=1.6, marker="." if ptitle in points else None,
                              label=f"{label} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        t = target.get(ptitle) if isinstance(target, dict) else target
        if t is not None:
            ax.axhline(t, color="grey", linestyle=":", linewidth=1, label=f"target {t:.3f}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_title(ptitle, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if len(panels) > 1:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
