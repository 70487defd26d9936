"""Pure functions on training-loss curves (no torch): what the convergence tables are made of.

A *curve* is a dict with at least ``losses`` (per optimizer step, the task loss without the
regulariser) and ``step_times`` (seconds of each step). Comparisons use the smoothed loss, a
bias-corrected EMA with ``beta = 0.9`` (as the run plots and TensorBoard show it), unless they
are told to read the held-out loss a run recorded (``eval_losses``; :class:`HeldOutLoss`).
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


class TrainingLoss:
    """The loss a comparison reads: the smoothed training loss (the default of every table).

    A measure gives a curve's final value (:meth:`final`) and the step at which the curve first
    reaches a target (:meth:`reach`); :class:`HeldOutLoss` is the other one.
    """

    name = "training"
    #: What the tables say the measure is.
    description = "smoothed (EMA 0.9, bias-corrected) training task loss"
    #: What a summary row adds after its task to name the measure (nothing for the default one).
    row_tag = ""
    #: The measure's short name in a table's prose (the sweep's criterion).
    label = "smoothed training loss"
    #: The title of the plot panel that shows the measure beside the training loss (``None``: the
    #: training-loss panel is the measure's own).
    panel: str | None = None

    def wording(self, config: dict) -> tuple[str, str]:
        """``(loss, target)``: how a table names the measure and AdaLoRA's target read on it, given the
        result's ``config``."""
        return self.label, "AdaLoRA's smoothed final loss"

    def final(self, curve: dict) -> float:
        """The value at the last step (``inf`` when there is none or it is not finite); a cached run's
        own ``final_smoothed`` when it has one (the same number, as the run stored it)."""
        stored = curve.get("final_smoothed")
        return stored if stored is not None else smoothed_final(curve["losses"])

    def reach(self, curve: dict, target: float) -> tuple[int | None, float | None]:
        """``(steps, seconds)`` until the measure is first ``<= target``; ``(None, None)`` if never."""
        return first_reach(curve["losses"], curve.get("step_times") or None, target)


class HeldOutLoss(TrainingLoss):
    """The held-out loss of a run with ``eval_loss_every`` (``eval_losses``: ``[step, loss]`` pairs).

    Taken on the same evaluation rows at every point, it has no batch-to-batch noise, so it is
    read unsmoothed; a target is reached at the first evaluated step at or below it (a curve
    evaluated every N steps resolves the step to N).
    """

    name = "held_out"
    description = "held-out loss (teacher-forced task loss of the evaluation rows, eval_loss_every)"
    row_tag = " (held-out)"
    label = "held-out loss"
    panel = label

    def wording(self, config: dict) -> tuple[str, str]:
        loss = f"{self.label} ({config['eval_split']} rows, every {config['eval_loss_every']} steps, unsmoothed)"
        return loss, f"AdaLoRA's final {loss}"

    def final(self, curve: dict) -> float:
        points = curve.get("eval_losses")
        if not points:
            raise ValueError(f"run {curve.get('key', '?')} has no held-out losses: it ran without eval_loss_every "
                             "(run it again with the held-out measure's settings)")
        return points[-1][1] if math.isfinite(points[-1][1]) else math.inf

    def reach(self, curve: dict, target: float) -> tuple[int | None, float | None]:
        self.final(curve)  # the same clear error for a run without the curve
        step = next((s for s, loss in curve["eval_losses"] if loss <= target), None)
        if step is None:
            return None, None
        times = curve.get("step_times")
        return step, (None if not times else sum(times[:step], 0.0))


#: The measures by name (``--target-on`` of the tuned benchmark).
MEASURES = {m.name: m for m in (TrainingLoss(), HeldOutLoss())}


def measure_of(config: dict) -> TrainingLoss:
    """The measure a tuned result's ``config`` was read on (results from before the field: training)."""
    return MEASURES[config.get("target_measure", TrainingLoss.name)]


def best_lr(curves: Iterable[dict], measure: TrainingLoss = MEASURES["training"]) -> float | None:
    """The learning rate whose curve ends with the lowest final ``measure`` (mean over its seeds).

    Curves marked ``diverged`` count as ``inf``: a run that blew up is never the best.
    """
    by_lr: dict[float, list[float]] = {}
    for c in curves:
        final = math.inf if c.get("diverged") else measure.final(c)
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
