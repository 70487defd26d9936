"""One optimizer step of the library: the order every caller (the training loop, benchmarks) uses.

Per step: each micro-batch's forward and ``(loss / grad_accum).backward()``;
``model.backward_hypernetworks()`` (pushes the factors' gradients through the hypernetworks);
gradient clipping; a check that the loss and the gradient norm are finite, before
``optimizer.step()`` applies anything; ``optimizer.step()``; ``model.after_step(step_index)``
(rank allocation, before ``zero_grad`` since it reads the gradients); ``scheduler.step()``;
``optimizer.zero_grad(set_to_none=True)``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..quant import autocast


@dataclass
class StepStats:
    """What one :func:`optimizer_step` did.

    Attributes:
        loss: Mean loss over the micro-batches (the non-finite value when ``finite`` is False).
        task_loss: Mean task loss without the regularizer (``model.last_task_loss``); None when the
            model does not report it.
        regularizer: Mean regularizer over the micro-batches that had one; None when none had.
        grad_norm: Total gradient norm before clipping; None when a loss was not finite.
        finite: False when a loss or the gradient norm was NaN / inf: nothing was applied and the
            gradients were cleared.
        problem: What was not finite, e.g. ``"the loss is nan at step 3 (micro-batch 1 of 2)"``.
        lr_factor: The scheduler's factor of the first parameter group at this step
            (``lr / initial_lr``, read before the scheduler steps).
        lr: The first parameter group's learning rate used by this step.
        seconds: Wall time of the step (micro-batches included when they are produced lazily).
    """

    loss: float
    task_loss: float | None
    regularizer: float | None
    grad_norm: float | None
    finite: bool
    problem: str | None
    lr_factor: float
    lr: float
    seconds: float


def trainable_parameters(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates, in its group order (what gradient clipping sees)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _mean_over_ranks(values: list[float | None], mean: Callable | None) -> list[float | None]:
    """``values`` averaged over the ranks (the ``None`` entries, alike on every rank, stay None)."""
    if mean is None:
        return values
    present = [i for i, v in enumerate(values) if v is not None]
    reduced = mean([values[i] for i in present])
    out = list(values)
    for i, v in zip(present, reduced):
        out[i] = v
    return out


def _accumulate(model: torch.nn.Module, forward: Callable, micro_batches: Iterable[Mapping[str, Any]],
                grad_accum: int, step_index: int, precision: str, mean: Callable | None,
                sync: Callable[[bool], Any] | None = None) -> tuple[list[float], list, list[float], str | None, float]:
    """Forward and backward of each micro-batch; stops at the first non-finite loss (no backward).

    With several ranks the recorded values are the means over the ranks, so every rank takes the
    same decision at a non-finite loss.
    """
    losses: list[float] = []
    task_losses: list = []
    regs: list[float] = []
    device = next(model.parameters()).device
    for micro, batch in enumerate(micro_batches):
        with sync(micro == grad_accum - 1) if sync is not None else contextlib.nullcontext():
            with autocast(precision, device):  # only the forward; the backward follows the forward's dtypes
                loss = forward(**batch).loss
            value, task_loss, reg = _mean_over_ranks([float(loss.detach()), getattr(model, "last_task_loss", None),
                                                      getattr(model, "last_regularizer", None)], mean)
            if not math.isfinite(value):
                return (losses, task_losses, regs,
                        f"the loss is {value} at step {step_index + 1} (micro-batch {micro + 1} of {grad_accum})",
                        value)
            (loss / grad_accum).backward()
        losses.append(value)
        task_losses.append(task_loss)
        if reg is not None:
            regs.append(reg)
    return losses, task_losses, regs, None, _mean(losses) if losses else float("nan")


def _clipped_gradient_norm(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                           clip_grad_norm: Callable | None, step_index: int) -> tuple[float, str | None]:
    """Pushes the factors' gradients through the hypernetworks, clips; ``(norm before clipping, problem)``."""
    if hasattr(model, "backward_hypernetworks"):
        model.backward_hypernetworks()
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    clip = clip_grad_norm or torch.nn.utils.clip_grad_norm_
    grad_norm = float(clip(trainable_parameters(optimizer), max_norm))
    problem = None if math.isfinite(grad_norm) else f"the gradient norm is {grad_norm} at step {step_index + 1}"
    return grad_norm, problem


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   micro_batches: Iterable[Mapping[str, Any]], *, step_index: int, max_grad_norm: float,
                   scheduler: Any = None, grad_accum: int | None = None,
                   on_update: Callable[[], None] | None = None, precision: str = "fp32",
                   forward: Callable | None = None, mean: Callable | None = None,
                   clip_grad_norm: Callable | None = None, sync: Callable[[bool], Any] | None = None) -> StepStats:
    """Runs one optimizer step over ``micro_batches`` (see the module docstring for the order).

    Args:
        model: An :class:`~hyperadalora.AdaptedModel` (or any module whose forward returns an
            output with ``.loss``; ``backward_hypernetworks`` / ``after_step`` are called when present).
        optimizer: Its optimizer.
        micro_batches: The step's micro-batches, keyword arguments of ``model(**batch)``; may be a
            lazy iterable (then give ``grad_accum``): it is consumed one batch at a time and not
            past a non-finite loss.
        step_index: The step's 0-based index (passed to ``model.after_step``; used in messages).
        max_grad_norm: Clip the total gradient norm to this; ``<= 0``: no clipping (the norm is
            still measured).
        scheduler: A learning-rate scheduler stepped after the update, or None.
        grad_accum: How many micro-batches the loss is averaged over (default: ``len(micro_batches)``).
        on_update: Called just before ``optimizer.step()``: from then until the caller has
            recorded the step, the training state is half updated.
        precision: ``fp32``, or ``bf16`` / ``fp16``: each forward runs under ``torch.autocast``
            of that dtype (:func:`hyperadalora.quant.autocast`); parameters and optimizer state
            keep their own dtypes (float32 master weights).
        forward: What the forward is called on (a DDP wrapper of ``model``); default ``model``.
        mean: With several processes, ``values -> their means over the ranks`` (a collective):
            the recorded losses are global and a non-finite one stops every rank alike.
        clip_grad_norm: ``(parameters, max_norm) -> total norm``; default torch's (a sharded
            model needs :func:`hyperadalora.integrations.fsdp.clip_grad_norm_`).
        sync: ``last -> context`` around each micro-batch's forward and backward (``last``: the
            step's final micro-batch); DDP's ``no_sync`` for the others, so that gradients are
            all-reduced once per step.

    Returns:
        The step's :class:`StepStats`. When ``finite`` is False the optimizer did not step, the
        model and scheduler are unchanged and the gradients are cleared.
    """
    start = time.perf_counter()
    if grad_accum is None:
        micro_batches = list(micro_batches)
        grad_accum = len(micro_batches)
    group = optimizer.param_groups[0]
    factor = group["lr"] / group.get("initial_lr", group["lr"])
    lr = group["lr"]
    losses, task_losses, regs, problem, loss = _accumulate(model, forward or model, micro_batches, grad_accum,
                                                           step_index, precision, mean, sync)
    grad_norm = None
    if problem is None:
        grad_norm, problem = _clipped_gradient_norm(model, optimizer, max_grad_norm, clip_grad_norm, step_index)
    task_loss = _mean(task_losses) if task_losses and None not in task_losses else None
    regularizer = _mean(regs) if regs else None
    if problem is not None:
        optimizer.zero_grad(set_to_none=True)
        return StepStats(loss, task_loss, regularizer, grad_norm, False, problem, factor, lr,
                         time.perf_counter() - start)
    if on_update is not None:
        on_update()
    optimizer.step()
    if hasattr(model, "after_step"):
        model.after_step(step_index)
    if hasattr(model, "compact"):
        model.compact(optimizer)  # AllocatorConfig.compact: cuts factors and their optimizer state
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss, task_loss, regularizer, grad_norm, True, None, factor, lr, time.perf_counter() - start)


__all__ = ["StepStats", "optimizer_step", "trainable_parameters"]
