"""Statistics a reviewer accepts for seed-level benchmark numbers (pure functions; scipy only).

* :func:`mean_ci`: the mean of per-seed values with its two-sided Student-t interval;
* :func:`paired_test`: a paired t test (:func:`scipy.stats.ttest_rel`) of two methods over the
  seeds both ran: the same seed gives both the same data order, so the pairing removes that noise;
* :func:`verdict`: a word only where the test is significant;
* :func:`good_lr_window`: the learning rates whose final loss is within a tolerance of the best
  one, a tuning-cost figure (a wide window: the method is cheap to tune).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError as err:  # an optional dependency: only the benchmark statistics need it
        raise ImportError("the benchmark statistics need scipy: pip install 'hyperadalora[bench]'") from err
    return stats


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float | None, float | None]:
    """``(mean, half width)`` of the two-sided Student-t interval of the mean.

    The half width is ``t_{(1+c)/2, n-1} * sd / sqrt(n)`` (sample sd); ``None`` with fewer than
    two values (no spread to estimate), and the mean is ``None`` with none.

    Raises:
        ValueError: ``confidence`` outside (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence}: give a fraction in (0, 1), e.g. 0.95")
    vals = [float(v) for v in values]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    t = float(_scipy_stats().t.ppf((1 + confidence) / 2, len(vals) - 1))
    return mean, t * sd / math.sqrt(len(vals))


@dataclass(frozen=True)
class PairedTest:
    """A paired t test of ``a - b`` over the seeds both have.

    Attributes:
        n: Pairs (seeds both ran).
        mean_diff: Mean of ``a - b``.
        t: The t statistic (``nan`` when every difference is equal).
        p: The two-sided p value (``nan`` likewise).
    """

    n: int
    mean_diff: float
    t: float
    p: float

    def significant(self, alpha: float = 0.05) -> bool:
        """Whether ``p < alpha`` (never for a ``nan`` p)."""
        return self.p < alpha


def paired_test(a: Mapping[int, float], b: Mapping[int, float]) -> PairedTest | None:
    """Paired t test of ``a`` against ``b`` (``{seed: value}``), on the seeds both have.

    Returns:
        ``None`` with fewer than two common seeds.
    """
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    xa, xb = [float(a[s]) for s in seeds], [float(b[s]) for s in seeds]
    res = _scipy_stats().ttest_rel(xa, xb)
    return PairedTest(len(seeds), sum(x - y for x, y in zip(xa, xb)) / len(seeds), float(res.statistic),
                      float(res.pvalue))


def verdict(test: PairedTest | None, higher_is_better: bool, alpha: float = 0.05) -> str:
    """``"better"`` / ``"worse"`` (of ``a`` against ``b``) where significant, else ``"n.s."``
    (``"n/a"`` without a test)."""
    if test is None:
        return "n/a"
    if not test.significant(alpha):
        return "n.s."
    return "better" if (test.mean_diff > 0) == higher_is_better else "worse"


def good_lr_window(final_loss: Mapping[float, float | None], tolerance: float = 0.02) -> list[float]:
    """The lrs whose final loss is at most ``(1 + tolerance)`` times the best (lowest) one, ascending.

    Missing (``None``) and non-finite losses (diverged runs) never count.

    Raises:
        ValueError: A negative tolerance.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance {tolerance} must be >= 0 (0.02: within 2% of the best)")
    finite = {lr: v for lr, v in final_loss.items() if v is not None and math.isfinite(v)}
    if not finite:
        return []
    best = min(finite.values())
    return sorted(lr for lr, v in finite.items() if v <= best * (1 + tolerance))
