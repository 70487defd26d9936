"""Sensitivity-LoRA's one-shot rank allocation, as arithmetic (arXiv 2509.09119, v1 sections 3 and App. E).

Before training, every adapted linear's inputs ``X`` over a calibration set give a GPTQ-style
Hessian ``H = 2 X X^T`` (``d_in x d_in``); only its diagonal is used. Per weight matrix, with
``l_1 >= ... >= l_m`` its sorted Hessian diagonal:

* global sensitivity ``S_g = tr(H) = sum_j l_j``;
* top-k sensitivity ``S_T = mean(l_1 .. l_k)``, ``k = floor(topk_fraction * m)`` (at least 1);
* effective rank ``S_E = min{k : sum_{j<=k} l_j / sum_j l_j >= alpha}``;
* local ``S_l = b1 S_T + b2 S_E`` and combined ``theta = g1 S_g + g2 S_l``, each coefficient
  ``sigma / mu^2`` of its metric across all adapted matrices;
* ranks ``r_w = theta_w / sum(theta) * r_total``, rounded so that the total is exact.

Decisions the paper leaves open, made here (each a setting or stated with its reason):

* ``diagonal="channel"`` (default): the ``d_in`` input-channel values, ``m = d_in``. The Hessian of
  ``W x`` w.r.t. ``W`` is ``H`` repeated for every output row, so ``diagonal="weight"`` repeats each
  value ``d_out`` times (``m = d_out * d_in``): it multiplies ``S_g`` and ``S_E`` by ``d_out``, so
  wide-output matrices (a LLaMA MLP's up projection, GQA's narrow k / v) rank differently.
  The repetition is computed with multiplicities, never materialised.
* ``sigma`` is the population standard deviation (``ddof = 0``); a metric equal on every matrix has
  ``sigma = 0`` and so weight 0 (it cannot tell matrices apart). If every weight is 0, all matrices
  get equal scores (an even split).
* The ``1/n`` scaling of ``H`` and its factor 2 do not change any rank: ``S_E`` is scale-free and
  ``sigma / mu^2 * S`` is invariant to scaling ``S``; so sums over tokens are used as they are.
  A damping ``lambda * I`` is not applied (the diagonal is what is ranked, not inverted).
* Budget unit: the paper splits a total *rank* ``r_total``; a rank costs ``d_in + d_out``
  parameters, so moving rank between matrices of different shapes changes the parameter count
  (on SmolLM2 a rank of an MLP matrix costs 2,112, one of a k / v projection 768). ``budget="params"`` splits
  ``avg_rank * sum(d_in + d_out)`` parameters instead (a uniform LoRA's count) in proportion to
  ``theta``, for comparisons at equal trainable-parameter budgets.
* Rounding: largest remainder (ties to the earlier matrix), so ``sum(r) == r_total`` exactly;
  every rank is clipped to ``[min_rank, cap]`` with ``cap = min(max_rank, d_in, d_out)``, the
  clipped matrices are fixed and the rest of the budget is split again in proportion until no
  bound is violated. ``min_rank=0`` lets a matrix drop out (left unadapted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

DIAGONAL_FORMS = ("channel", "weight")
BUDGET_UNITS = ("ranks", "params")


@dataclass(frozen=True)
class MatrixSensitivity:
    """The three metrics of one weight matrix."""

    global_: float
    topk: float
    effective_rank: float


def matrix_sensitivity(diag: torch.Tensor, *, d_out: int = 1, diagonal: str = "channel",
                       topk_fraction: float = 0.5, alpha: float = 0.85) -> MatrixSensitivity:
    """``S_g``, ``S_T`` and ``S_E`` of one matrix from its input-channel Hessian diagonal.

    Args:
        diag: ``(d_in,)`` Hessian diagonal (``2 * sum over tokens of x_j^2``).
        d_out: Output width; used only with ``diagonal="weight"`` (each value repeated ``d_out`` times).
        diagonal: ``"channel"`` or ``"weight"`` (see the module docstring).
        topk_fraction: Fraction of the ``m`` values averaged by ``S_T``.
        alpha: Energy fraction that defines the effective rank.

    Returns:
        The three metrics as floats.
    """
    if diagonal not in DIAGONAL_FORMS:
        raise ValueError(f"diagonal={diagonal!r} is not supported; allowed values: {', '.join(DIAGONAL_FORMS)}")
    if diag.numel() == 0:
        raise ValueError("an empty Hessian diagonal has no sensitivity: the calibration saw no input")
    repeat = d_out if diagonal == "weight" else 1
    values = torch.sort(diag.detach().to(torch.float64).flatten(), descending=True).values  # (d_in,)
    m = values.numel() * repeat
    total = float(values.sum()) * repeat
    k = max(1, math.floor(topk_fraction * m))
    # Top k of the repeated sequence: whole channels, then part of the next one.
    whole, part = divmod(k, repeat)
    top_sum = float(values[:whole].sum()) * repeat + (float(values[whole]) * part if part else 0.0)
    return MatrixSensitivity(global_=total, topk=top_sum / k, effective_rank=float(_effective_rank(values, repeat,
                                                                                                  total, alpha)))


def _effective_rank(values: torch.Tensor, repeat: int, total: float, alpha: float) -> int:
    """Smallest ``k`` whose top-``k`` energy of the (repeated) values reaches ``alpha * total``."""
    if total <= 0:
        return values.numel() * repeat  # no energy anywhere: every direction counts alike
    need = alpha * total
    cumulative = torch.cumsum(values, 0) * repeat  # energy after whole channels
    j = int(torch.searchsorted(cumulative, torch.tensor(need, dtype=cumulative.dtype) * (1 - 1e-12)))
    j = min(j, values.numel() - 1)
    before = float(cumulative[j - 1]) if j > 0 else 0.0
    within = math.ceil((need * (1 - 1e-12) - before) / float(values[j])) if values[j] > 0 else repeat
    return j * repeat + min(max(within, 1), repeat)


def cv_weight(values: list[float]) -> float:
    """``sigma / mu^2`` of a metric across matrices (population sigma; 0 when ``mu == 0``)."""
    t = torch.tensor(values, dtype=torch.float64)
    mu = float(t.mean())
    if mu == 0:
        return 0.0
    return float(t.std(unbiased=False)) / (mu * mu)


def combined_scores(metrics: Mapping[str, MatrixSensitivity]) -> dict[str, float]:
    """``theta`` of every matrix (``g1 S_g + g2 (b1 S_T + b2 S_E)``, coefficient-of-variation weights)."""
    names = list(metrics)
    s_g = [metrics[n].global_ for n in names]
    s_t = [metrics[n].topk for n in names]
    s_e = [metrics[n].effective_rank for n in names]
    b1, b2 = cv_weight(s_t), cv_weight(s_e)
    s_l = [b1 * t + b2 * e for t, e in zip(s_t, s_e)]
    g1, g2 = cv_weight(s_g), cv_weight(s_l)
    theta = [g1 * g + g2 * loc for g, loc in zip(s_g, s_l)]
    if not any(v > 0 for v in theta):
        theta = [1.0] * len(names)  # no metric separates the matrices: split evenly
    return dict(zip(names, theta))


def allocate_ranks(scores: Mapping[str, float], total: int, caps: Mapping[str, int], min_rank: int = 1,
                   costs: Mapping[str, int] | None = None) -> dict[str, int]:
    """Splits a budget in proportion to ``scores`` into ranks within ``[min_rank, caps[name]]``.

    With ``costs=None`` the budget is ``total`` ranks and the split is exact (largest remainder).
    With ``costs`` (what one rank of a matrix costs, e.g. its ``d_in + d_out`` parameters) the
    budget is ``total`` cost units: each matrix's share of it is proportional to its score, its
    rank is that share divided by its cost, and the rounding adds one rank at a time, largest
    remainder first, wherever it still fits the budget; the total cost is then at most
    ``total`` and short of it by less than one rank of every matrix that could still grow.

    Args:
        scores: Non-negative score per matrix (``theta``).
        total: The budget: ranks (average rank x number of matrices), or cost units with ``costs``.
        caps: Largest rank per matrix (``min(max_rank, d_in, d_out)``).
        min_rank: Smallest rank of any matrix (0 lets a matrix drop out).
        costs: Positive cost of one rank per matrix (``None``: 1 each, a rank budget).

    Returns:
        ``{name: rank}``; ``sum(rank * cost) == total`` with unit costs.

    Raises:
        ValueError: If ``total`` cannot be met within the bounds (the message gives the range).
    """
    names = list(scores)
    cost = {n: 1 for n in names} if costs is None else {n: costs[n] for n in names}
    low = {n: min(min_rank, caps[n]) for n in names}
    lo_sum, hi_sum = sum(low[n] * cost[n] for n in names), sum(caps[n] * cost[n] for n in names)
    if not lo_sum <= total <= hi_sum:
        unit = "rank" if costs is None else "cost"
        raise ValueError(f"a total {unit} of {total} cannot be split over {len(names)} matrices with ranks in "
                         f"[{min_rank}, cap]: the possible totals are {lo_sum}..{hi_sum}; change the average rank, "
                         "min_rank or max_rank")
    shares = _bounded_shares(scores, total, {n: low[n] * cost[n] for n in names},
                             {n: caps[n] * cost[n] for n in names})
    exact = {n: shares[n] / cost[n] for n in names}  # real-valued ranks
    ranks = {n: math.floor(exact[n] + 1e-9) for n in names}
    left = total - sum(ranks[n] * cost[n] for n in names)
    order = sorted(names, key=lambda n: (-(exact[n] - ranks[n]), names.index(n)))
    for n in order:
        if left <= 0:
            break
        if ranks[n] < caps[n] and cost[n] <= left:
            ranks[n] += 1
            left -= cost[n]
    return ranks


def _bounded_shares(scores: Mapping[str, float], total: int, low: Mapping[str, int], caps: Mapping[str, int]
                    ) -> dict[str, float]:
    """Proportional real-valued shares, with out-of-bound matrices fixed at their bound."""
    fixed: dict[str, float] = {}
    while True:
        free = [n for n in scores if n not in fixed]
        budget = total - sum(fixed.values())
        weight = sum(scores[n] for n in free)
        shares = {n: (scores[n] / weight * budget if weight > 0 else budget / len(free)) for n in free}
        over = {n: caps[n] for n in free if shares[n] > caps[n]}
        under = {n: low[n] for n in free if shares[n] < low[n]}
        if not over and not under:
            return {**fixed, **shares}
        # Fix the side that violates more budget first; the other side is re-checked next round.
        excess = sum(shares[n] - caps[n] for n in over) - sum(low[n] - shares[n] for n in under)
        fixed.update(over if excess >= 0 and over else under)


class InputSquareSums:
    """Forward pre-hooks that sum ``x_j^2`` over every real token of each watched linear's input.

    ``2 * sums[name]`` is the diagonal of ``H = 2 X X^T``. Padding tokens are left out through
    :meth:`set_token_mask` (the ``attention_mask`` of the batch about to run), so a batch padded to
    its longest row counts what an unpadded one would.

    Args:
        modules: The linears to watch, by name (their input's last dimension is ``d_in``).
    """

    def __init__(self, modules: Mapping[str, torch.nn.Module]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self._mask: torch.Tensor | None = None
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """``(batch, seq)`` 1/0 mask of the next forward's real tokens (``None``: all count)."""
        self._mask = mask
        self.tokens += int(mask.sum()) if mask is not None else 0

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0].detach().to(torch.float64)  # (batch, seq, d_in) or (tokens, d_in)
            sq = x * x
            if self._mask is not None and sq.dim() == 3 and self._mask.shape == sq.shape[:2]:
                sq = sq * self._mask[..., None].to(sq.dtype)
            total = sq.reshape(-1, sq.shape[-1]).sum(0)  # (d_in,)
            self.sums[name] = self.sums[name] + total if name in self.sums else total
        return hook

    def remove(self) -> None:
        """Removes every hook (the model is as it was)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def hessian_diagonals(self) -> dict[str, torch.Tensor]:
        """``diag(2 X X^T)`` per watched module, ``(d_in,)`` in float64."""
        return {name: 2.0 * s for name, s in self.sums.items()}
