"""Reading and writing adapter tensors that may be sharded (FSDP2 ``DTensor`` parameters).

Under ``torch.distributed.fsdp.fully_shard`` (see
:func:`hyperadalora.integrations.distributed.shard`) a parameter outside its module's forward
is a ``DTensor`` holding one shard per rank, and so is its ``.grad``. Whatever reads whole
factors outside a forward pass (the orthogonality regulariser, the allocator's importance
scores, checkpoints, state hashes) goes through :func:`full`, and whatever writes into them (the
allocator's in-place masking, loading) through :func:`mul_` and :func:`copy_`. Both are no-ops for plain tensors, so a
single process and DDP are untouched. :func:`full` is a collective on sharded tensors: every
rank must call it, in the same order (the training contract already runs the same calls on
every rank).
"""

from __future__ import annotations

import torch

try:  # torch.distributed may be missing from a build (then nothing is ever sharded)
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
except ImportError:  # pragma: no cover - builds without distributed
    DTensor = Replicate = distribute_tensor = None  # type: ignore[assignment,misc]


def is_sharded(t: torch.Tensor | None) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter or gradient sharded by FSDP2)."""
    return DTensor is not None and isinstance(t, DTensor)


class PartitionedParameterError(NotImplementedError):
    """A DeepSpeed ZeRO-2/3 partitioned parameter or gradient reached code that needs it whole."""


def is_deepspeed_managed(t: torch.Tensor | None) -> bool:
    """Whether DeepSpeed ZeRO has taken ``t`` over (it tags its parameters with ``ds_id``)."""
    return t is not None and getattr(t, "ds_id", None) is not None


def refuse_partitioned(t: torch.Tensor, what: str) -> None:
    """Raises :class:`PartitionedParameterError` when ``t`` is a ZeRO-3 partition (outside its
    module's forward DeepSpeed leaves an empty placeholder, ``ds_numel`` elements elsewhere):
    reading it as the factor would be silently wrong or fail deep inside a matmul (peft's AdaLoRA
    regulariser under ZeRO-3)."""
    if is_deepspeed_managed(t) and t.numel() != getattr(t, "ds_numel", t.numel()):
        raise PartitionedParameterError(
            f"{what} is a DeepSpeed ZeRO-3 partition (shape {tuple(t.shape)} here, {getattr(t, 'ds_shape', '?')} "
            "whole): "
            "hyperadalora reads whole factors for the orthogonality regulariser and the rank allocator, and does not "
            "gather DeepSpeed partitions. Use FSDP2 (hyperadalora.integrations.distributed.shard), DDP, or ZeRO-1")


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``t.full_tensor()`` (an all-gather, differentiable) for a ``DTensor``,
    ``t`` itself otherwise (a DeepSpeed ZeRO-3 partition is refused, :func:`refuse_partitioned`)."""
    if is_sharded(t):
        return t.full_tensor()
    refuse_partitioned(t, "an adapter factor")
    return t


def mul_(target: torch.Tensor, factor: torch.Tensor) -> None:
    """``target.mul_(factor)`` in place, where ``factor`` is a whole (unsharded) tensor that is
    identical on every rank and ``target`` may be sharded (each rank scales its own shard)."""
    if is_sharded(target):
        # A replicated DTensor: the sharded multiply takes each rank's slice locally, no communication.
        factor = DTensor.from_local(factor, target.device_mesh, [Replicate()] * target.device_mesh.ndim,
                                    run_check=False)
    target.mul_(factor)


def like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A whole tensor ``value`` (identical on every rank) laid out as ``ref``: this rank's shard
    as a ``DTensor`` when ``ref`` is sharded (no communication), ``value`` otherwise."""
    if not is_sharded(ref) or is_sharded(value):
        return value
    return distribute_tensor(value.to(device=ref.device), ref.device_mesh, ref.placements, src_data_rank=None)


def copy_(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` for a whole ``value`` and a possibly sharded ``target`` (loading)."""
    target.copy_(like(value, target))


__all__ = ["PartitionedParameterError", "copy_", "full", "is_deepspeed_managed", "is_sharded", "like", "mul_",
           "refuse_partitioned"]
