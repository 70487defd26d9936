"""How a run spreads over processes (``RunConfig.distributed``): one process, DDP or FSDP2.

``hyperadalora train`` runs as one process, or as one process per device under ``torchrun`` or
``accelerate launch`` (which set ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``). Each way is one class
here with the same small interface, and :class:`~.run.Run` never asks which one it has:

* ``batch_size`` stays the *global* micro-batch (rows per micro-batch over all processes), split
  evenly: rank ``k`` takes rows ``k, k + N, ...`` of every batch the seeded order draws (as
  accelerate's ``split_batches=True``). A run therefore computes the same thing on any number of
  processes (to float reduction order; dropout draws differ), its data position is one counter,
  and a checkpoint resumes on another number of processes.
* Rank 0 alone writes: the run directory (its name is broadcast), ``config.yaml``, ``log.jsonl``,
  evaluations, plots, reporters, adapters and training checkpoints. The other ranks take part in
  what needs them (a sharded model's gathers) and write nothing.
* Logged losses are the mean over the ranks; a non-finite loss stops every rank at the same step.
* DDP (:func:`~hyperadalora.integrations.distributed.wrap_ddp`): rank 0 evaluates on its own
  (the other ranks wait at the next step). FSDP2 (:func:`~hyperadalora.integrations.fsdp.shard`):
  every rank runs the evaluation's forwards (they gather the shards), rank 0 records them; the
  root group is gathered around an evaluation, so that ``generate`` (which bypasses the root's
  forward) sees whole embeddings and head.
* Training checkpoints hold whole tensors (the adapter, AdamW's state) and each rank's
  generators (``rng.safetensors`` for rank 0, ``rng-rank<k>.safetensors`` for the others).

``distributed=auto`` (the default) picks ``none`` for one process, ``fsdp`` under ``accelerate
launch`` with an FSDP config (``ACCELERATE_USE_FSDP``), else ``ddp`` (as the Hugging Face
Trainer does under torchrun).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import DISTRIBUTED, RunConfig
LAUNCH = "torchrun --nproc_per_node N -m hyperadalora.cli train ..."


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} is not an integer (set by torchrun / accelerate launch)") from None


def _accelerate_kind(config: RunConfig, environ: Mapping[str, str]) -> str | None:
    """``fsdp`` under an accelerate FSDP config, checking the settings hyperadalora cannot honour."""
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise ValueError("accelerate launched DeepSpeed, which `hyperadalora train` does not drive: use an FSDP "
                         "config (examples/accelerate_fsdp.yaml) or a multi-GPU (DDP) one; see docs/distributed.md")
    mixed = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mixed not in ("no", "", config.precision):
        raise ValueError(f"accelerate's mixed_precision is {mixed} but the run's precision is {config.precision}: "
                         f"add precision={mixed} to the command (hyperadalora applies it) or set mixed_precision: "
                         "'no' in the accelerate config")
    if environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return None
    if environ.get("FSDP_VERSION", "2") != "2":
        raise ValueError(f"the accelerate config asks for FSDP version {environ['FSDP_VERSION']}; hyperadalora "
                         "shards with FSDP2 (fully_shard): set fsdp_version: 2")
    if environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise ValueError("fsdp_offload_params: true is not supported by hyperadalora's sharding: set it to false")
    return "fsdp"


def uses_cuda(config: RunConfig) -> bool:
    """Whether the run trains on a GPU: ``device=cuda``, or ``auto`` when torch sees one.

    Raises:
        ValueError: ``device=cuda`` without a CUDA device.
    """
    available = torch.cuda.is_available()
    if config.device == "cuda" and not available:
        raise ValueError("device=cuda, but torch sees no CUDA device (torch.cuda.is_available() is False): install a "
                         "CUDA build of torch on a machine with a GPU, or use device=auto / device=cpu")
    return available and config.device != "cpu"


def resolve_kind(config: RunConfig, environ: Mapping[str, str] | None = None) -> str:
    """The way this process runs (``none``, ``ddp`` or ``fsdp``), from the config and the launcher's
    environment; every refusal comes before anything is loaded.

    Raises:
        ValueError: ``ddp`` / ``fsdp`` asked for outside a launcher, several processes with
            ``distributed=none``, a batch that does not split evenly, a launcher setting that
            hyperadalora does not honour (named, with the fix), or ``device=cuda`` without a GPU.
    """
    uses_cuda(config)
    environ = os.environ if environ is None else environ
    world = _env_int(environ, "WORLD_SIZE", 1)
    launched = "RANK" in environ and "WORLD_SIZE" in environ
    kind = config.distributed
    if kind == "auto":
        kind = "none" if world == 1 else (_accelerate_kind(config, environ) or "ddp")
    elif launched:
        _accelerate_kind(config, environ)  # its settings are checked either way
    if kind == "none" and world > 1:
        raise ValueError(f"this is one of {world} processes (WORLD_SIZE={world}) but distributed=none: each would "
                         "train the whole run on its own; use distributed=ddp or distributed=fsdp (or auto)")
    if kind != "none" and not launched:
        raise ValueError(f"distributed={kind} needs one process per device started by a launcher ($RANK and "
                         f"$WORLD_SIZE unset): `{LAUNCH} distributed={kind}` or `accelerate launch -m hyperadalora.cli "
                         "train ...`; for one process use distributed=none")
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} is the global micro-batch and must split evenly over the "
                         f"{world} processes: use a multiple of {world}")
    allocator = config.adapter.allocator  # None: a fixed-rank method (LoRA, DoRA, DyLoRA) without one
    if kind != "none" and allocator is not None and allocator.compact != "off":
        raise ValueError(f"adapter.allocator.compact={allocator.compact!r} cuts the factors' storage, "
                         f"which {kind.upper()} holds in its buckets / shards: use adapter.allocator.compact=off with "
                         "several processes (the saved adapter keeps the pruned ranks masked)")
    if kind == "fsdp" and config.export != "none":
        raise ValueError(f"export={config.export} reads the whole model at the end, which FSDP holds in shards: "
                         "keep export=none and run `hyperadalora export RUN_DIR` afterwards (one process)")
    return kind


class SingleProcess:
    """One process: everything happens here, nothing is communicated."""

    kind = "none"
    evaluates_on_every_rank = False

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.rank, self.world_size = 0, 1
        # None: the CPU, where the model was loaded; under a launcher, set before this is read
        self.device = torch.device("cuda", torch.cuda.current_device()) if uses_cuda(config) else None

    @property
    def is_main(self) -> bool:
        """Whether this process writes (rank 0)."""
        return self.rank == 0

    def rows(self, indices: Sequence[int]) -> list[int]:
        """This rank's rows of a global micro-batch's row indices."""
        return list(indices)[self.rank::self.world_size]

    def place(self, model: nn.Module) -> None:
        """Moves ``model`` to this process's GPU, when it trains on one (a quantised base loads there already)."""
        if self.device is not None and self.config.quantize is None:
            model.to(self.device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """Prepares the AdaptedModel (before the optimizer exists); returns the module to call forward on."""
        self.place(model)
        return model

    def mean(self, values: Sequence[float]) -> list[float]:
        """The mean of each value over the ranks (a collective)."""
        return list(values)

    def all_ranks(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (a collective)."""
        return flag

    def clip_grad_norm(self, parameters: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
        """The total gradient norm of the whole model, clipped to ``max_norm`` on every rank alike."""
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def on_main(self, make: Any) -> Any:
        """``make()`` on rank 0, its result on every rank; rank 0's exception is raised on every rank."""
        return make()

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value``, in rank order, on rank 0 (None elsewhere)."""
        return [value]

    def barrier(self) -> None:
        """Waits for every rank."""

    def accumulation(self, last: bool) -> Any:
        """The context of one micro-batch's forward and backward (``last``: the step's final one)."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def evaluation(self, model: nn.Module) -> Iterator[None]:
        """Around an evaluation of ``model``."""
        yield

    def close(self) -> None:
        """Ends the process group this object started (none here)."""


class DataParallel(SingleProcess):
    """One process per device; DDP averages the gradients (:func:`~hyperadalora.integrations.distributed.wrap_ddp`)."""

    kind = "ddp"

    def __init__(self, config: RunConfig) -> None:
        cuda = uses_cuda(config)
        self.started_group = not dist.is_initialized()
        if cuda:  # before the device is read: each process takes its own GPU
            torch.cuda.set_device(_env_int(os.environ, "LOCAL_RANK", 0))
        if self.started_group:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
        super().__init__(config)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def wrap(self, model: nn.Module) -> nn.Module:
        from ..integrations.distributed import wrap_ddp

        self.place(model)
        kwargs = {"device_ids": [self.device.index]} if self.device is not None else {}
        self.ddp = wrap_ddp(model, **kwargs)
        return self.ddp

    def accumulation(self, last: bool) -> Any:
        # Gradients are all-reduced once per step (DDP keeps the others local), as accelerate does.
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def _reduce(self, values: Sequence[float], op: Any) -> list[float]:
        device = self.device if self.device is not None else torch.device("cpu")
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(t, op=op)
        return t.cpu().tolist()

    def mean(self, values: Sequence[float]) -> list[float]:
        return [v / self.world_size for v in self._reduce(values, dist.ReduceOp.SUM)]

    def all_ranks(self, flag: bool) -> bool:
        return bool(self._reduce([1.0 if flag else 0.0], dist.ReduceOp.MIN)[0])

    def on_main(self, make: Any) -> Any:
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", make())
            except Exception as exc:  # sent to every rank, raised there too
                box[0] = ("error", exc)
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            if self.is_main:
                raise value
            raise type(value)(f"rank 0: {value}") if isinstance(value, (ValueError, OSError)) else value
        return value

    def gather(self, value: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, out, dst=0)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self.started_group and dist.is_initialized():
            dist.destroy_process_group()


class FullyShardedParallel(DataParallel):
    """One process per device, every parameter sharded (:func:`~hyperadalora.integrations.fsdp.shard`)."""

    kind = "fsdp"
    evaluates_on_every_rank = True

    def wrap(self, model: nn.Module) -> nn.Module:
        from ..integrations.fsdp import shard

        self.place(model)
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
        return shard(model, precision=self.config.precision, reshard_after_forward=reshard)

    def accumulation(self, last: bool) -> Any:
        # Reduce-scattered every micro-batch: skipping it would hold whole unsharded gradients.
        return contextlib.nullcontext()

    def clip_grad_norm(self, parameters: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
        from ..integrations.fsdp import clip_grad_norm_

        return clip_grad_norm_(parameters, max_norm)

    @contextlib.contextmanager
    def evaluation(self, model: nn.Module) -> Iterator[None]:
        model.unshard()  # the root group whole: generate() calls the base model past the root's forward
        try:
            yield
        finally:
            model.reshard()


_WORLDS = {"none": SingleProcess, "ddp": DataParallel, "fsdp": FullyShardedParallel}


def start_parallel(config: RunConfig, environ: Mapping[str, str] | None = None) -> SingleProcess:
    """Checks the launch (:func:`resolve_kind`) and joins the process group when there is one."""
    return _WORLDS[resolve_kind(config, environ)](config)


__all__ = ["DISTRIBUTED", "DataParallel", "FullyShardedParallel", "SingleProcess", "resolve_kind", "start_parallel",
           "uses_cuda"]
