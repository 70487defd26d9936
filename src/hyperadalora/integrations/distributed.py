"""Multi-process data parallel (``torch.distributed``, DDP) for an :class:`~hyperadalora.AdaptedModel`.

What DDP already does right, and what it does not:

* Trainable parameters (direct factors, hypernetwork parameters, DoRA magnitudes, saved heads)
  are the only parameters with ``requires_grad``, so they are the only ones DDP all-reduces.
  The frozen base model is only broadcast once, when DDP is built.
* Direct factors: the AdaLoRA importance scores read ``p.grad``, which DDP has averaged, so
  every rank scores, prunes and masks identically.
* Hyper source: the importance scores read the gradients of the *generated* factors
  (``dL/dF``, non-leaf tensors). DDP never sees those: each rank holds its own micro-batch's
  gradient, and the ranks would prune different singular values. :func:`prepare_ddp` installs a
  hook (``source.grad_sync``) that averages them across ranks before they are used:
  before the allocator scores (``after_step``) and, with ``HyperConfig(generate="per_step")``,
  before :meth:`~hyperadalora.AdaptedModel.backward_hypernetworks` pushes them into the
  hypernetworks. In ``per_step`` mode the hypernetwork parameters are left out of DDP (their
  graph is run outside DDP's backward) and get identical gradients from the averaged ``dL/dF``.
* Recurrent hypernetwork states and AdaLoRA masks are buffers updated in ``after_step`` from
  quantities that are now identical on every rank, so they stay identical without being
  communicated. :func:`prepare_ddp` keeps DDP from broadcasting them (``broadcast_buffers``
  would overwrite rank ``k``'s with rank 0's at every forward and hide a divergence), and
  :func:`assert_in_sync` checks it: every rank hashes its masks, states, allocator state and
  trainable parameters and the hashes are gathered and compared.

Use::

    import torch.distributed as dist
    from hyperadalora.integrations.distributed import wrap_ddp, assert_in_sync

    dist.init_process_group("gloo")            # "nccl" on GPUs (one process per GPU)
    model = ha.wrap(base, config)              # same seed on every rank
    ddp = wrap_ddp(model)                      # prepare_ddp(model) + DistributedDataParallel(model)
    ...
    loss = ddp(**batch).loss; loss.backward()  # this rank's share of the global batch
    model.backward_hypernetworks()             # per_step only; no-op otherwise
    opt.step(); model.after_step(step); opt.zero_grad()
    assert_in_sync(model)                      # e.g. every N steps and before saving

Fully sharded (FSDP2) training: :func:`~hyperadalora.integrations.fsdp.shard` (re-exported here)
instead of ``wrap_ddp``, and :func:`~hyperadalora.integrations.fsdp.save_adapter` to save.

See ``docs/distributed.md`` for several GPUs / nodes, FSDP2 and DeepSpeed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import sharding
from .common import require_adapted
from .fsdp import save_adapter, shard, transformer_blocks
from .grad_sync import install_grad_sync, sync_generated_gradients, world_size

__all__ = ["assert_in_sync", "install_grad_sync", "prepare_ddp", "save_adapter", "shard", "state_checksums",
           "sync_generated_gradients", "transformer_blocks", "wrap_ddp"]


def _method_buffers(adapted) -> list[torch.Tensor]:
    """The method's per-layer state that is not trained (e.g. keep-masks): updated identically on
    every rank, never broadcast."""
    return [t for layer in adapted.adapted_layers.values() for t in adapted.method.state_tensors(layer).values()
            if not isinstance(t, nn.Parameter)]


def _adapter_tensor_names(module: nn.Module) -> list[str]:
    """Names (relative to ``module``) of what DDP must leave alone: adapter buffers, and the
    hypernetwork parameters in ``per_step`` mode."""
    adapted = require_adapted(module, "prepare_ddp")
    ids = {id(t) for t in _method_buffers(adapted) + adapted.source.ddp_ignored_tensors()}
    names = [n for n, p in module.named_parameters() if id(p) in ids]
    names += [n for n, b in module.named_buffers() if id(b) in ids]
    return names


def prepare_ddp(model: nn.Module, group: Any = None) -> nn.Module:
    """Gets an AdaptedModel ready to be wrapped in ``DistributedDataParallel`` (call it first).

    * installs the hook that averages the generated factors' gradients across ranks (hyper
      source), so that ``model.after_step`` allocates ranks identically everywhere;
    * tells DDP to leave the adapter buffers (masks, hypernetwork states) alone, and, with
      ``HyperConfig(generate="per_step")``, the hypernetwork parameters (their gradients come
      from the averaged ``dL/dF`` instead).

    Idempotent. With one process it only installs the hook (which then does nothing).

    Args:
        model: The AdaptedModel, or the module that will be passed to DDP (it must contain one).
        group: The process group DDP will use (``None``: the default group).

    Returns:
        ``model``.
    """
    adapted = require_adapted(model, "prepare_ddp")
    install_grad_sync(adapted, group)
    ignore = _adapter_tensor_names(model)
    previous = list(model.__dict__.get("_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = sorted(set(previous) | set(ignore))
    return model


def wrap_ddp(model: nn.Module, group: Any = None, **ddp_kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """``prepare_ddp(model)`` and ``DistributedDataParallel(model, process_group=group, **ddp_kwargs)``.

    On GPUs pass ``device_ids=[local_rank]`` (after moving the model there); on CPU (gloo) none.
    """
    prepare_ddp(model, group)
    return nn.parallel.DistributedDataParallel(model, process_group=group, **ddp_kwargs)


def _digest(t: torch.Tensor) -> str:
    data = sharding.full(t.detach()).to("cpu").contiguous()  # a sharded (FSDP2) tensor: gathered first
    h = hashlib.blake2b(digest_size=16)
    h.update(str((tuple(data.shape), str(data.dtype))).encode())
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def state_checksums(model: nn.Module, parameters: bool = True) -> dict[str, str]:
    """Hashes of everything that must be identical on every rank.

    Keys: ``state/<module>.<tensor>`` (the method's untrained layer state, e.g. keep-masks),
    ``source/<key>`` (saved source tensors: hypernetwork states and parameters, or direct factors),
    ``allocator/<tensor>`` and ``allocator/meta`` (importance EMAs, budget, rank pattern, step
    counters), ``method/rank`` (a sampled training rank, DyLoRA), and with ``parameters``
    ``param/<name>`` for every trainable parameter.
    """
    adapted = require_adapted(model, "state_checksums")
    out: dict[str, str] = {}
    for name, layer in adapted.adapted_layers.items():
        for key, t in adapted.method.state_tensors(layer).items():
            if not isinstance(t, nn.Parameter):
                out[f"state/{name}.{key}"] = _digest(t)
    for name, t in adapted.source.state_tensors().items():
        out[f"source/{name}"] = _digest(t)
    for name, t in adapted.allocator.state_dict().items():
        out[f"allocator/{name}"] = _digest(t)
    meta = json.dumps(adapted.allocator.meta_dict(), sort_keys=True)
    out["allocator/meta"] = hashlib.blake2b(meta.encode(), digest_size=16).hexdigest()
    if adapted.dylora_rank is not None:
        out["method/rank"] = str(adapted.dylora_rank)
    if parameters:
        for name, p in adapted.named_parameters():
            if p.requires_grad:
                out[f"param/{name}"] = _digest(p)
    return out


def assert_in_sync(model: nn.Module, group: Any = None, parameters: bool = True) -> dict[str, str]:
    """Checks that every rank holds the same masks, states, allocator state (and trainable
    parameters); a collective, call it on every rank.

    Args:
        model: The AdaptedModel (or a wrapper of it).
        group: The process group (``None``: the default group).
        parameters: Also compare the trainable parameters.

    Returns:
        This rank's :func:`state_checksums` (also with one process, where nothing is compared).

    Raises:
        RuntimeError: Naming the entries that differ and the ranks they differ on.
    """
    mine = state_checksums(model, parameters)
    world = world_size(group)
    if world == 1:
        return mine
    gathered: list[dict[str, str] | None] = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    reference = gathered[0]
    problems = []
    for rank, theirs in enumerate(gathered[1:], start=1):
        keys = sorted(set(reference) | set(theirs))
        bad = [k for k in keys if reference.get(k) != theirs.get(k)]
        if bad:
            problems.append(f"rank {rank} differs from rank 0 in {len(bad)} entr{'y' if len(bad) == 1 else 'ies'}: "
                            + ", ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))
    if problems:
        raise RuntimeError("hyperadalora state diverged across data-parallel ranks (was prepare_ddp(model) called "
                           "before wrapping it in DDP, and after_step() called on every rank?): "
                           + "; ".join(problems))
    return mine
