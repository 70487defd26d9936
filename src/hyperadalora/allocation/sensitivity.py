"""``sensitivity``: Sensitivity-LoRA's one-shot rank allocation (arXiv 2509.09119; DESIGN.md section 1).

Ranks are decided ONCE, before any adapter exists, from the Hessian diagonals of the adapted
linears' inputs over a calibration set (forward passes only), and the adapters are then created
at those ranks (``AdapterConfig.rank_pattern``): parameters, optimizer state and FLOPs are those
of a plain LoRA with that rank pattern, never a larger rank masked down. The arithmetic is in
:mod:`.sensitivity_math`; this module runs the calibration and plugs the result into the wrap:

* :func:`sensitivity_rank_pattern` / :func:`calibrate_sensitivity`: the calibration on a base
  model (eval mode, ``no_grad``, hooks removed after; the model is left exactly as it was);
* :class:`SensitivityPolicy`: the registered policy. ``decides_before_wrap`` tells the wrap (and
  the training run) to call :meth:`SensitivityPolicy.prepare_config` first; after the wrap it is a
  fixed policy, or, with ``AllocatorConfig.then``, hands over to an in-training policy (AdaLoRA
  pruning from the allocated initial ranks).

Decisions beyond those of :mod:`.sensitivity_math`:

* The average rank is ``AllocatorConfig.avg_rank`` or else ``AdapterConfig.r`` (for AdaLoRA the
  initial rank), so ``r_total = average * number of matrices`` is what a uniform adapter of rank
  ``r`` would hold: the same rank total, redistributed (with ``budget="params"``, the same
  parameter count: a rank costs ``d_in + d_out``, LoRA's count; AdaLoRA's one ``lam`` per rank
  and DoRA's per-module magnitude are left out of the cost).
* Calibration batches are the task's own training micro-batches (labels are dropped, the
  ``attention_mask`` excludes padding); for instruction tasks that is the tokenised prompt and
  response, which is what the adapted layers see in training.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..layers import linear_weight
from .base import POLICY_REGISTRY, RankPolicy, register_policy
from .fixed import FixedRanks
from .sensitivity_math import InputSquareSums, MatrixSensitivity, allocate_ranks, combined_scores, matrix_sensitivity

if TYPE_CHECKING:
    from ..config import AdapterConfig, AllocatorConfig


@dataclass
class SensitivityReport:
    """What a calibration decided and what it cost.

    Attributes:
        ranks: ``{module: rank}`` (0: the module is left unadapted).
        scores: ``{module: theta}`` (the combined sensitivity).
        metrics: ``{module: MatrixSensitivity}`` (``S_g``, ``S_T``, ``S_E``).
        rows: Calibration rows (examples) seen.
        tokens: Real (unpadded) tokens seen.
        seconds: Wall time of the calibration pass and the allocation.
        average_rank: The average rank the total was computed from.
        budget: ``ranks`` or ``params`` (``AllocatorConfig.budget``).
        parameters: ``sum(rank * (d_in + d_out))``, the adapters' factor parameters.
    """

    ranks: dict[str, int]
    scores: dict[str, float]
    metrics: dict[str, MatrixSensitivity]
    rows: int
    tokens: int
    seconds: float
    average_rank: int
    budget: str = "ranks"
    parameters: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible record (what a run directory's ``allocation.json`` holds)."""
        return {"rows": self.rows, "tokens": self.tokens, "seconds": round(self.seconds, 4),
                "average_rank": self.average_rank, "total_rank": sum(self.ranks.values()),
                "budget": self.budget, "parameters": self.parameters,
                "ranks": self.ranks, "scores": self.scores,
                "metrics": {n: dataclasses.asdict(m) for n, m in self.metrics.items()}}


def _weight_shape(module: nn.Module) -> tuple[int, int]:
    return tuple(linear_weight(module).shape)  # (d_out, d_in)


def _model_inputs(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    # Labels would only add a loss nobody reads.
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}


def _rows_in(batch: Mapping[str, Any]) -> int:
    first = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    return int(first.shape[0]) if first is not None else 0


@torch.no_grad()
def hessian_diagonals(model: nn.Module, target_names: list[str], batches: Iterable[Mapping[str, Any]]
                      ) -> tuple[dict[str, torch.Tensor], int, int]:
    """``diag(2 X X^T)`` of every target linear's input over ``batches`` (forward passes only).

    The model runs in eval mode (no dropout) under ``no_grad``; every module's train/eval mode is
    restored and the hooks are removed afterwards, so the model is exactly as it was.

    Returns:
        ``(diagonals, rows, tokens)``: ``{module: (d_in,) float64}``, rows and real tokens seen.
    """
    modules = {n: model.get_submodule(n) for n in target_names}
    modes = [(m, m.training) for m in model.modules()]
    device = next(model.parameters()).device
    sums = InputSquareSums(modules)
    rows = 0
    try:
        model.eval()
        for batch in batches:
            mask = batch.get("attention_mask")
            sums.set_token_mask(mask.to(device) if isinstance(mask, torch.Tensor) else None)
            model(**_model_inputs(batch, device))
            rows += _rows_in(batch)
    finally:
        sums.remove()
        for m, mode in modes:
            m.training = mode
    missing = [n for n in target_names if n not in sums.sums]
    if missing:
        raise ValueError(f"the calibration never ran {len(missing)} target module(s) (first {missing[0]!r}): "
                         "give at least one batch that reaches every adapted layer")
    return sums.hessian_diagonals(), rows, sums.tokens


def calibrate_sensitivity(model: nn.Module, target_names: list[str], batches: Iterable[Mapping[str, Any]],
                          settings: AllocatorConfig, average_rank: int) -> SensitivityReport:
    """Runs the calibration and the allocation; returns ranks, scores and costs.

    Args:
        model: The base model (not yet wrapped); left unchanged.
        target_names: The modules to allocate ranks to (names as ``model.named_modules()``).
        batches: Model inputs (dicts of tensors, an ``attention_mask`` marks real tokens).
        settings: ``topk_fraction``, ``alpha``, ``diagonal``, ``min_rank``, ``max_rank``, ``budget``.
        average_rank: Total rank ``= average_rank * len(target_names)`` (``budget="params"``: the
            parameters of that many ranks at every matrix, ``average_rank * sum(d_in + d_out)``).
    """
    start = time.perf_counter()
    diags, rows, tokens = hessian_diagonals(model, target_names, batches)
    shapes = {n: _weight_shape(model.get_submodule(n)) for n in target_names}
    metrics = {n: matrix_sensitivity(diags[n], d_out=shapes[n][0], diagonal=settings.diagonal,
                                     topk_fraction=settings.topk_fraction, alpha=settings.alpha)
               for n in target_names}
    scores = combined_scores(metrics)
    largest = settings.max_rank if settings.max_rank is not None else max(max(s) for s in shapes.values())
    caps = {n: min(largest, *shapes[n]) for n in target_names}
    per_rank = {n: sum(shapes[n]) for n in target_names}  # d_out + d_in parameters per rank
    if settings.budget == "params":
        ranks = allocate_ranks(scores, average_rank * sum(per_rank.values()), caps, settings.min_rank, per_rank)
    else:
        ranks = allocate_ranks(scores, average_rank * len(target_names), caps, settings.min_rank)
    return SensitivityReport(ranks, scores, metrics, rows, tokens, time.perf_counter() - start, average_rank,
                             settings.budget, sum(ranks[n] * per_rank[n] for n in target_names))


def sensitivity_rank_pattern(model: nn.Module, target_names: list[str], batches: Iterable[Mapping[str, Any]],
                             settings: AllocatorConfig, average_rank: int | None = None) -> dict[str, int]:
    """``{module: rank}`` decided by Sensitivity-LoRA on the base ``model`` (see :func:`calibrate_sensitivity`).

    Args:
        average_rank: Defaults to ``settings.avg_rank`` (required when that is ``None``).
    """
    average = average_rank if average_rank is not None else settings.avg_rank
    if average is None:
        raise ValueError("sensitivity_rank_pattern needs average_rank (or settings.avg_rank)")
    return calibrate_sensitivity(model, target_names, batches, settings, average).ranks


@register_policy
class SensitivityPolicy(FixedRanks):
    """Ranks decided before the wrap (:meth:`prepare_config`) and fixed afterwards."""

    name = "sensitivity"
    adaptive = False
    decides_before_wrap = True

    @classmethod
    def training_policy(cls, config: AllocatorConfig) -> type[RankPolicy]:
        # AllocatorConfig.then: an in-training policy may prune further from the allocated ranks.
        return cls if config.then == "none" else POLICY_REGISTRY[config.then]

    @classmethod
    def prepare_config(cls, config: AdapterConfig, model: nn.Module, target_names: list[str],
                       batches: Iterable[Mapping[str, Any]]) -> tuple[AdapterConfig, SensitivityReport]:
        """``config`` with ``rank_pattern`` decided on the base ``model``'s ``target_names`` from ``batches``."""
        settings = config.allocator
        average = settings.avg_rank if settings.avg_rank is not None else config.r
        report = calibrate_sensitivity(model, target_names, batches, settings, average)
        return dataclasses.replace(config, rank_pattern=dict(report.ranks)), report


__all__ = ["SensitivityPolicy", "SensitivityReport", "calibrate_sensitivity", "hessian_diagonals",
           "sensitivity_rank_pattern"]
