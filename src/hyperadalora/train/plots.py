"""PNG plots of a run: the loss curve, the rank allocated per module (AdaLoRA), overlays."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's ``pyplot`` on the file-only Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def smooth(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard shows it); NaNs are skipped."""
    out, avg, n = [], 0.0, 0
    for x in values:
        if x is not None and np.isfinite(x):
            n += 1
            avg = beta * avg + (1 - beta) * x
        out.append(avg / (1 - beta**n) if n else float("nan"))
    return out


def short_module_name(name: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``L3.attn.query`` (and Llama alike)."""
    s = re.sub(r"^.*?\blayers?\.(\d+)\.", r"L\1.", name)
    for old, new in (("attention.self.", "attn."), ("attention.output.dense", "attn.out"),
                     ("intermediate.dense", "ffn.in"), ("output.dense", "ffn.out"), ("self_attn.", "attn."),
                     ("mlp.", "mlp."), ("attention.attn.", "attn.")):
        s = s.replace(old, new)
    return s


def plot_loss(rows: Sequence[dict], evals: Sequence[dict], path: str | Path, title: str,
              metric: str | None = None) -> Path:
    """Training loss per step (raw and smoothed), task loss, the held-out loss (rows' ``eval_loss``),
    and the eval metric on a second axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    task = [r.get("task_loss") for r in rows]
    ax.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss (per step)")
    ax.plot(steps, smooth(loss), color="tab:blue", linewidth=1.8, label="loss (smoothed)")
    if any(t is not None for t in task) and any(
            t is not None and abs(t - v) > 1e-9 for t, v in zip(task, loss)):
        ax.plot(steps, smooth([t if t is not None else float("nan") for t in task]), color="tab:green",
                linewidth=1.2, linestyle="--", label="task loss (smoothed)")
    held_out = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if held_out:  # eval_loss_every: the same loss on fixed rows, so on the training loss's axis
        ax.plot([p[0] for p in held_out], [p[1] for p in held_out], "s-", color="tab:purple", markersize=3,
                linewidth=1.2, label="held-out loss")
    ax.set_xlabel("optimizer step")
    finite = [v for v in loss + task + [p[1] for p in held_out] if v is not None and np.isfinite(v) and v > 0]
    wide = bool(finite) and max(finite) / min(finite) > 30  # e.g. a regulariser that grew: log scale
    if wide:
        ax.set_yscale("log")
    ax.set_ylabel("training loss" + (" (log scale)" if wide else ""))
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    points = [(e["step"], e[metric]) for e in evals if metric and e.get(metric) is not None]
    if points:
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in points], [p[1] for p in points], "o-", color="tab:red", label=f"eval {metric}")
        ax2.set_ylabel(f"eval {metric}", color="tab:red")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_rank_heatmap(modules: Sequence[str], history: Sequence[tuple[int, Sequence[int]]], total_steps: int,
                      max_rank: int, path: str | Path, title: str) -> Path:
    """Rank kept per module (rows) over the optimizer steps (columns), as a heat map.

    Args:
        modules: Module names (one row each).
        history: ``[(step, ranks per module)]`` at every step where the ranks changed (the
            first entry is the starting ranks); each holds until the next entry.
        total_steps: The last step on the x axis.
        max_rank: The colour scale's upper end (the initial rank ``r``).
    """
    plt = pyplot()
    steps = max(1, total_steps)
    grid = np.zeros((len(modules), steps), dtype=float)
    for i, (step, ranks) in enumerate(history):  # column j shows the ranks after step j + 1
        end = history[i + 1][0] if i + 1 < len(history) else steps + 1
        grid[:, max(step, 1) - 1:end - 1] = np.asarray(ranks, dtype=float)[:, None]
    height = min(14.0, 2.0 + 0.16 * len(modules))
    fig, (ax, axf) = plt.subplots(1, 2, figsize=(11, height), dpi=110, gridspec_kw={"width_ratios": [5, 1]},
                                  sharey=True)
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=max_rank,
                   extent=(0.5, steps + 0.5, len(modules) - 0.5, -0.5))
    labels = [short_module_name(m) for m in modules]
    every = max(1, len(modules) // 60)
    ax.set_yticks(range(0, len(modules), every))
    ax.set_yticklabels(labels[::every], fontsize=6)
    ax.set_xlabel("optimizer step")
    ax.set_title("rank kept per module", fontsize=9)
    final = grid[:, -1]
    axf.barh(range(len(modules)), final, color="tab:purple")
    axf.set_xlim(0, max_rank)
    axf.set_xlabel("final rank")
    axf.grid(alpha=0.3, axis="x")
    fig.colorbar(im, ax=[ax, axf], fraction=0.03, pad=0.02, label="rank")
    fig.suptitle(f"{title} (total final rank {int(final.sum())})", fontsize=10)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def layer_and_type(name: str) -> tuple[str, str]:
    """``bert.encoder.layer.3.attention.self.query`` -> ``("3", "attn.query")``; no layer index: ``("-", name)``."""
    short = short_module_name(name)
    head, dot, rest = short.partition(".")
    if dot and re.fullmatch(r"L\d+", head):
        return head[1:], rest
    return "-", short


def rank_allocation_figure(ranks: dict[str, int], title: str):
    """Ranks per module as a matplotlib figure: layers (rows) x module types (columns).

    A module absent from a layer is blank; rank 0 (left unadapted) shows as 0. Close the
    figure (``pyplot().close(fig)``) when done with it.
    """
    plt = pyplot()
    cells = {layer_and_type(n): r for n, r in ranks.items()}
    layers = sorted({k[0] for k in cells}, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
    types = list(dict.fromkeys(k[1] for k in cells))
    grid = np.full((len(layers), len(types)), np.nan)
    for (layer, kind), r in cells.items():
        grid[layers.index(layer), types.index(kind)] = r
    fig, ax = plt.subplots(figsize=(2.0 + 0.9 * len(types), 1.5 + 0.32 * len(layers)), dpi=110)
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0)
    if len(layers) * len(types) <= 400:  # numbers stay readable
        for i, j in zip(*np.nonzero(~np.isnan(grid))):
            ax.text(j, i, str(int(grid[i, j])), ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(types)))
    ax.set_xticklabels(types, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=7)
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, label="rank")
    ax.set_title(f"{title}\n(total rank {sum(ranks.values())} over {len(ranks)} modules)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_rank_allocation(ranks: dict[str, int], path: str | Path, title: str) -> Path:
    """Ranks decided before training (e.g. ``sensitivity``) as a grid (:func:`rank_allocation_figure`) in a PNG."""
    fig = rank_allocation_figure(ranks, title)
    fig.savefig(path)
    pyplot().close(fig)
    return Path(path)


def rank_allocation_image(ranks: dict[str, int], title: str) -> np.ndarray:
    """The grid of :func:`rank_allocation_figure` rendered as an ``(height, width, 3)`` uint8 RGB array."""
    fig = rank_allocation_figure(ranks, title)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # (H, W, 4) -> (H, W, 3)
    pyplot().close(fig)
    return rgb


def plot_loss_overlay(curves: dict[str, tuple[Sequence[int], Sequence[float]]], path: str | Path,
                      title: str) -> Path:
    """Several runs' training losses (raw, faint, and smoothed) on one axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for (label, (steps, values)), color in zip(curves.items(), colors * 4):
        ax.plot(steps, values, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(steps, smooth(values), color=color, linewidth=1.8, label=f"{label} (smoothed)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training task loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
