"""Pure functions on training-loss curves (no torch): what the convergence tables are made of.

A *curve* is a dict with at least ``losses`` (per optimizer step, the task loss without the
regulariser) and ``step_times`` (seconds of each step). Every comparison uses the smoothed
loss: a bias-corrected EMA with ``beta = 0.9`` (as the run plots and TensorBoard show it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from ..train.plots import smooth

BETA = 0.9


def smoothed_final(losses: Sequence[float], beta: float = BETA) -> float:
    """The smoothed loss at the last step (``inf`` for an empty or non-finite curve)."""
    if not losses:
        return math.inf
    last = smooth(losses, beta)[-1]
    return last if math.isfinite(last) else math.inf


def first_reach(losses: Sequence[float], step_times: Sequence[float] | None, target: float,
                beta: float = BETA) -> tuple[int | None, float | None]:
    """``(steps, seconds)`` until the smoothed loss first is ``<= target``; ``(None, None)`` if never.

    ``steps`` counts optimizer steps (1-based); ``seconds`` sums ``step_times`` up to that step, and
    is ``None`` when ``step_times`` is (a curve imported from a result that kept only its losses).
    """
    if step_times is not None and len(step_times) < len(losses):
        raise ValueError(f"{len(losses)} losses but only {len(step_times)} step times")
    steps = next((i + 1 for i, value in enumerate(smooth(losses, beta)) if value <= target), None)
    if steps is None:
        return None, None
    return steps, (None if step_times is None else sum(step_times[:steps], 0.0))


def best_lr(curves: Iterable[dict]) -> float | None:
    """The learning rate whose curve ends with the lowest smoothed loss (mean over its seeds).

    Curves marked ``diverged`` count as ``inf``: a run that blew up is never the best.
    """
    by_lr: dict[float, list[float]] = {}
    for c in curves:
        final = math.inf if c.get("diverged") else smoothed_final(c["losses"])
        by_lr.setdefault(float(c["lr"]), []).append(final)
    if not by_lr:
        return None
    means = {lr: sum(v) / len(v) for lr, v in by_lr.items()}
    lr = min(means, key=lambda k: (means[k], k))
    return lr if math.isfinite(means[lr]) else None


def mean_and_spread(curves: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per-step mean, minimum and maximum over curves (cut to the shortest one)."""
    if not curves:
        return [], [], []
    n = min(len(c) for c in curves)
    cols = [[c[i] for c in curves] for i in range(n)]
    return [sum(col) / len(col) for col in cols], [min(col) for col in cols], [max(col) for col in cols]


def mean_or_none(values: Iterable[float | None]) -> float | None:
    """Mean of the values, ``None`` if any is ``None`` (a run that never reached the target)."""
    vals = list(values)
    if not vals or any(v is None for v in vals):
        return None
    return sum(vals) / len(vals)
