"""Averaging the generated factors' gradients (``dL/dF``, hyper source) across data-parallel ranks.

DDP and FSDP reduce parameter gradients only; the allocator's importance scores and, with
``HyperConfig(generate="per_step")``, the hypernetworks' backward read ``dL/dF`` of the
*generated* factors, which each rank computes from its own micro-batch. The hook installed
here makes them identical on every rank before use (used by
:func:`~hyperadalora.integrations.distributed.prepare_ddp` and
:func:`~hyperadalora.integrations.fsdp.shard`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .common import require_adapted

__all__ = ["install_grad_sync", "sync_generated_gradients", "world_size"]


def world_size(group: Any = None) -> int:
    """The number of ranks of ``group`` (1 without an initialised process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


@torch.no_grad()
def sync_generated_gradients(model: nn.Module, group: Any = None) -> bool:
    """Averages ``dL/dF`` of every generated factor across the ranks of ``group``.

    Runs at most once per set of generated factors (a second call in the same step is a no-op),
    so the hook may fire both before ``backward_hypernetworks`` and before allocation. Every
    rank must call it (it is a collective); the hooks installed by :func:`install_grad_sync` make sure
    of that, since every rank runs the same ``after_step`` / ``backward_hypernetworks`` calls.

    Args:
        model: An AdaptedModel (or a DDP / accelerate wrapper of one).
        group: The process group (``None``: the default group).

    Returns:
        Whether anything was all-reduced (``False`` for the direct source, one process, or when
        already done for these factors).
    """
    source = require_adapted(model, "sync_generated_gradients").source
    tensors = source.generated_tensors()
    if tensors is None or world_size(group) == 1 or source.synced_generation is tensors:
        return False
    grads = []
    for t in tensors.values():  # same order on every rank
        if t.grad is None:  # a rank without a gradient still takes part, with zeros
            t.grad = torch.zeros_like(t)
        grads.append(t.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat.div_(world_size(group))
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    source.synced_generation = tensors  # a reference (not an id), so it cannot be confused with a later dict
    return True


def install_grad_sync(model: nn.Module, group: Any = None) -> None:
    """Makes the factor source average its generated factors' gradients across the ranks of
    ``group`` before using them (:func:`sync_generated_gradients`; used by :func:`prepare_ddp`
    and :func:`~hyperadalora.integrations.fsdp.shard`)."""
    adapted = require_adapted(model, "install_grad_sync")
    adapted.source.grad_sync = functools.partial(sync_generated_gradients, adapted, group)
