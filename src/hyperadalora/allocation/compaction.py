"""Cutting trained factors down to their kept rank components (``AllocatorConfig.compact``).

Once pruning is final, a masked rank component only costs compute and optimizer memory: its
column of ``P``, its ``lam`` and its row of ``Q`` are exactly zero in the forward (or have no
effect on it). :func:`slice_parameter_` removes such components from a parameter *in place*
(``param.data`` is replaced), together with its gradient and every per-element optimizer state
tensor (AdamW's ``exp_avg`` and ``exp_avg_sq``), so the optimizer keeps pointing at the same
``Parameter`` objects and needs no new param groups: its next step on the kept elements is the
step it would have taken before (Adam's update is element-wise).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def slice_parameter_(param: torch.nn.Parameter, index: torch.Tensor, dim: int,
                     optimizer: torch.optim.Optimizer | None = None) -> None:
    """Keeps ``index`` along ``dim`` of ``param``, its ``.grad`` and its optimizer state.

    Args:
        param: A trained parameter (modified in place: same object, smaller ``.data``).
        index: Long tensor of the kept positions along ``dim`` (may be empty).
        dim: The rank axis of ``param``.
        optimizer: The optimizer holding ``param``; state tensors of ``param``'s shape are sliced,
            others (Adam's scalar ``step``) are left as they are.
    """
    old_shape = param.shape
    index = index.to(param.device)
    if optimizer is not None:
        state = optimizer.state.get(param)
        for key, value in (state or {}).items():
            if torch.is_tensor(value) and value.shape == old_shape:
                state[key] = value.index_select(dim, index.to(value.device))
    grad = param.grad
    param.grad = None  # a grad must match the shape of the data it belongs to
    kept = param.data.index_select(dim, index)
    forget_grad_accumulator_(param)
    param.data = kept
    if grad is not None:
        param.grad = grad.index_select(dim, index)


def forget_grad_accumulator_(param: torch.nn.Parameter) -> None:
    """Makes autograd build a new gradient accumulator for ``param`` at its next use.

    A graph still alive (a training loop's ``loss`` holds the last step's graph until the next
    forward has run) keeps ``param``'s accumulator node, which autograd reuses for the next
    forward; that node recorded the old shape and rejects the gradient of the cut parameter
    ("StackBackward0 returned an invalid gradient"). Assigning ``.data`` of another dtype is
    the documented case in which autograd drops a live accumulator (``set_data`` resets it on
    a type change, not on a shape change), so a momentary placeholder of another dtype is set.
    """
    other = torch.float64 if param.dtype != torch.float64 else torch.float32
    param.data = torch.empty(0, dtype=other, device=param.device)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's tensor state (what compaction shrinks)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if torch.is_tensor(v))


__all__ = ["forget_grad_accumulator_", "optimizer_state_bytes", "slice_parameter_"]
