"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for an AdaptedModel.

:func:`shard` puts every transformer block in a group of its own and the rest in the root
group (the :class:`~hyperadalora.AdaptedModel` itself):

* a block's group (the classes transformers declares in ``_no_split_modules``, see
  :func:`transformer_blocks`) holds its frozen base weights *and* the direct adapter factors of its
  adapted layers (and DoRA magnitudes): they are used by the same forward, so one all-gather
  brings both, and the adapters and their optimizer state are sharded like the base (at 70B,
  rank-64 adapters with AdamW state are several GB: too much to replicate);
* the root group holds the embeddings, the final norm and head, the saved heads
  (``modules_to_save``) and the hypernetworks. The hypernetworks run once per forward, at the
  root, before any block (``HyperSource.prepare_training_forward``), so their parameters are
  whole while the factors are generated; the generated factors are plain tensors that the
  blocks read. With ``HyperConfig(generate="per_step")`` the hypernetworks' backward runs
  after FSDP's backward (``backward_hypernetworks``), when FSDP has already resharded and
  reduced, so they are kept out of sharding (``ignored_params``): replicated, with identical
  gradients on every rank from the averaged ``dL/dF`` (as under DDP).

Buffers (AdaLoRA keep-masks, hypernetwork states) are never sharded by FSDP2: they are updated
identically on every rank in ``after_step``. What reads whole factors outside a forward (the
orthogonality regulariser, the allocator's scores and in-place masking, saving, state hashes)
goes through :mod:`hyperadalora.sharding`, which gathers a sharded parameter or gradient.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import sharding
from ..adapter_io import whole_adapter_tensors
from ..adapter_io import save_adapter as write_adapter
from ..quant import is_quantized, precision_dtype
from .common import require_adapted
from .grad_sync import install_grad_sync

__all__ = ["clip_grad_norm_", "load_checkpoint", "save_adapter", "save_checkpoint", "shard", "transformer_blocks"]

OPTIMIZER_NAME = "optimizer.safetensors"  # the names train/resume.py uses, in the same layout
OPTIMIZER_META_NAME = "optimizer.json"
STATE_NAME = "training_state.safetensors"
STATE_META_NAME = "training_state.json"


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`shard` gives a group each, in model order (a match nested in another
    match belongs to the outer one).

    The classes transformers declares in ``model._no_split_modules`` (what accelerate's FSDP
    auto-wrap uses: Llama's ``LlamaDecoderLayer``; BERT's ``BertLayer`` and ``BertEmbeddings``),
    else the children of every ``nn.ModuleList`` whose children all share one class.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names]
    else:
        found = [child for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
                 and len({type(c) for c in m}) == 1 for child in m]
    inner = {id(sub) for m in found for sub in m.modules() if sub is not m}
    return [m for m in found if id(m) not in inner]  # nested matches belong to their outer block


def _refuse_unsupported(adapted, blocks: list[nn.Module]) -> None:
    """Clear errors before any sharding happens."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard() needs an initialised process group: call torch.distributed.init_process_group("
                           "'nccl' or 'gloo') on every rank first (e.g. under torchrun)")
    if sharding.is_sharded(next((p for p in adapted.parameters()), None)):
        raise ValueError("shard() got a model that is already sharded (its parameters are DTensors); call it once")
    if adapted.allocator.compaction_enabled():
        raise ValueError("AllocatorConfig.compact='final' cuts the factors' storage, which FSDP2 owns: "
                         "use compact='off' with shard() (compact the saved adapter afterwards instead)")
    if not blocks:
        raise ValueError(f"shard() found no transformer blocks in {type(adapted.model).__name__} (no "
                         "_no_split_modules and no nn.ModuleList of identical modules): pass blocks=[...]")


def _keep_quantized_weights_unpacked(adapted) -> None:
    """A bitsandbytes 4-bit base shards as it is: FSDP2 cuts the packed uint8 weight along its
    first axis (mixed precision leaves non-float parameters alone) and gathers it back bit for
    bit, and ``Linear4bit.forward`` restores the ``quant_state`` FSDP's plain parameter lacks from
    the module. On a CPU with AVX512-BF16, bitsandbytes would also repack that weight in place
    for inference (``weight.data = ...``), which would replace the storage FSDP gathers into:
    switched off here."""
    for module in adapted.modules():
        if is_quantized(module) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def shard(model: nn.Module, *, precision: str = "fp32", blocks: list[nn.Module] | None = None,
          mesh: Any = None, reshard_after_forward: bool = True) -> nn.Module:
    """Shards an AdaptedModel with FSDP2: ``fully_shard`` per transformer block, then the root.

    Call it on every rank after :func:`hyperadalora.wrap` (same seed everywhere) and before
    creating the optimizer; keep calling ``model(**batch)``, ``loss.backward()``,
    ``model.backward_hypernetworks()``, ``optimizer.step()``, ``model.after_step(step)`` on every
    rank. It also installs the hook that averages the generated factors' gradients across ranks
    (hyper source), as :func:`~hyperadalora.integrations.distributed.prepare_ddp` does.

    Args:
        model: The AdaptedModel (not a DDP / accelerate wrapper); modified in place.
        precision: The run's precision (``fp32``, ``bf16``, ``fp16``): with bf16 / fp16 the
            unsharded parameters are cast to it for the forward and backward
            (``MixedPrecisionPolicy(param_dtype=..., reduce_dtype=float32)``); the sharded
            (master) parameters and the optimizer state stay float32.
        blocks: The modules to shard one by one (default :func:`transformer_blocks` of the base).
        mesh: A 1-D ``DeviceMesh`` (default: every rank, on the parameters' device type).
        reshard_after_forward: FSDP2's setting for the blocks (``False``: keep them gathered
            between forward and backward, more memory, fewer all-gathers).

    Returns:
        ``model`` (its class is now also an ``FSDPModule``).

    Raises:
        RuntimeError: No process group is initialised.
        ValueError: Already sharded, ``compact='final'``, or no blocks found.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    adapted = require_adapted(model, "shard")
    if adapted is not model:
        raise ValueError(f"shard() shards the AdaptedModel itself, got a {type(model).__name__} around it: "
                         "call shard(adapted_model) before any other wrapper")
    dtype = precision_dtype(precision)
    blocks = transformer_blocks(adapted.model) if blocks is None else list(blocks)
    _refuse_unsupported(adapted, blocks)
    if mesh is None:
        mesh = init_device_mesh(next(adapted.parameters()).device.type, (dist.get_world_size(),))
    mp = (MixedPrecisionPolicy() if dtype == torch.float32 else
          MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32))
    install_grad_sync(adapted, mesh.get_group())
    _keep_quantized_weights_unpacked(adapted)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # per_step: the hypernetworks' backward runs after FSDP's; keep them whole (see the module doc).
    ignored = {t for t in adapted.source.ddp_ignored_tensors() if isinstance(t, nn.Parameter)}
    fully_shard(adapted, mesh=mesh, mp_policy=mp, ignored_params=ignored or None)
    return adapted


def save_adapter(model: nn.Module, directory: str | os.PathLike, rank: int = 0, group: Any = None) -> Path:
    """Saves a sharded (or DDP / single-process) model's whole adapter, written by one rank.

    A collective: call it on every rank. Each sharded tensor is gathered (``full_tensor``), and
    rank ``rank`` writes the usual adapter folder (:meth:`AdaptedModel.save_adapter`'s layout,
    loadable by :func:`hyperadalora.load_adapter` on one process); the others wait.

    Args:
        model: The AdaptedModel (sharded by :func:`shard`, or not).
        directory: The adapter folder.
        rank: The rank that writes.
        group: The process group (``None``: the default group).

    Returns:
        The folder's path.
    """
    adapted = require_adapted(model, "save_adapter")
    tensors = whole_adapter_tensors(adapted)
    path = Path(directory)
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank(group) == rank:
        write_adapter(adapted, path, tensors=tensors)
    if distributed:
        dist.barrier(group=group)
    return path


def _is_writer(rank: int, group: Any) -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank(group) == rank


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | os.PathLike,
                    rank: int = 0, group: Any = None) -> Path:
    """Saves what a sharded run needs to continue exactly: the whole adapter (with the allocator
    state), the whole optimizer state, the training counters and torch's generators (dropout);
    a collective, written by ``rank``. The data position is the caller's (``model.steps_taken``
    optimizer steps were done).

    The optimizer state is ``optimizer.state_dict()`` with every shard gathered, so the folder is
    the same whatever the number of ranks (and loads into an unsharded run too).

    Args:
        model: The AdaptedModel (sharded by :func:`shard`, or not).
        optimizer: Its optimizer.
        directory: The checkpoint folder (an adapter folder plus the files named above).
        rank: The rank that writes.
        group: The process group (``None``: the default group).
    """
    from ..fileio import write_json, write_tensors
    from ..train.resume import flatten_optimizer_state, whole_optimizer_state

    adapted = require_adapted(model, "save_checkpoint")
    path = save_adapter(adapted, directory, rank, group)
    state = whole_optimizer_state(optimizer)
    if _is_writer(rank, group):
        tensors, meta = flatten_optimizer_state(state)
        write_tensors(path / OPTIMIZER_NAME, tensors)
        write_json(path / OPTIMIZER_META_NAME, meta, sort_keys=False)
        rng = adapted.rng_state()
        # torch's generators (dropout): the same seed and draws on every rank, so rank 0's stand for all.
        generators = {"torch_cpu_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            generators["torch_cuda_rng"] = torch.cuda.get_rng_state()
        write_tensors(path / STATE_NAME, {**generators, **({} if rng is None else {"method_rng": rng})})
        # A fixed-rank policy's step counters (an adaptive one's are in the adapter's allocator_state.json).
        write_json(path / STATE_META_NAME, {"steps_taken": adapted.steps_taken, "dylora_rank": adapted.dylora_rank,
                                            "allocator": adapted.allocator.meta_dict()})
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)
    return path


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | os.PathLike) -> None:
    """Restores :func:`save_checkpoint`'s folder into a freshly wrapped (and sharded) model and
    its new optimizer; every rank reads the whole tensors and keeps its shards.

    Call it on every rank after :func:`shard` and after creating the optimizer (with the same
    parameter groups as the saved run), then continue with the next step.
    """
    import json

    from safetensors.torch import load_file

    from ..train.resume import load_optimizer_state

    adapted = require_adapted(model, "load_checkpoint")
    path = Path(directory)
    for name in (OPTIMIZER_NAME, OPTIMIZER_META_NAME, STATE_NAME, STATE_META_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: {directory} is not a checkpoint written by "
                                    "hyperadalora.integrations.fsdp.save_checkpoint")
    adapted.load_adapter_weights(str(path))
    load_optimizer_state(optimizer, path)
    generators = load_file(str(path / STATE_NAME))
    if "method_rng" in generators:
        adapted.set_rng_state(generators["method_rng"])
    torch.set_rng_state(generators["torch_cpu_rng"])
    if "torch_cuda_rng" in generators and torch.cuda.is_available():
        torch.cuda.set_rng_state(generators["torch_cuda_rng"])
    meta = json.loads((path / STATE_META_NAME).read_text())
    adapted.restore_steps_taken(meta["steps_taken"])
    if not adapted.allocator.adaptive:
        adapted.allocator.load_state({}, meta["allocator"])
    if meta["dylora_rank"] is not None:  # the rank sampled for the next step (as train/resume.py restores it)
        for layer in adapted.adapted_layers.values():
            layer.dylora_b = meta["dylora_rank"]


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a sharded model, whose gradients may be a mix of
    ``DTensor`` shards and whole tensors (the hypernetworks kept out of sharding with
    ``generate="per_step"``), which torch's own refuses ("got mixed torch.Tensor and DTensor").

    The shards' norm is reduced across the ranks; the whole tensors' gradients are identical on
    every rank, so their norm is taken locally. Every rank gets the same total norm (the norm
    of one process's gradients on the whole batch) and scales alike; a collective.

    Args:
        parameters: The parameters (an iterable; those without ``.grad`` are skipped).
        max_norm: The largest total norm kept.
        norm_type: The norm (2 by default; ``inf`` for the largest entry).

    Returns:
        The total norm before clipping (a plain 0-d tensor).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [g for g in grads if sharding.is_sharded(g)]
    whole = [g for g in grads if not sharding.is_sharded(g)]
    groups = [g for g in (sharded, whole) if g]  # torch's foreach kernels take no mix of DTensors and tensors
    if not groups:
        return torch.tensor(0.0)
    parts = [sharding.full(torch.nn.utils.get_total_norm(g, norm_type)).float().cpu() for g in groups]
    total = torch.linalg.vector_norm(torch.stack(parts), norm_type)
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))  # torch's float32 clip coefficient
    if coef < 1.0:
        for group in groups:
            torch._foreach_mul_(group, coef)
    return total
