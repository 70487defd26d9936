"""Factor sources (DESIGN.md section 2): where the adapters' factors come from.

* :class:`DirectSource`: each factor is an ``nn.Parameter`` of its layer, trained by the optimizer.
* :class:`HyperSource`: one hypernetwork per factor kind generates every module's factor.
  Each factor has a *state* ``S`` (a buffer, initialised exactly as the direct factor would
  be). Per training forward (or per optimizer step, ``HyperConfig.generate``), for each (kind,
  shape) group of modules, one call ``F = S + scale * H_kind(S)`` generates the factors of every
  module in the group at once; the adapted layers read their slice of ``F``. Gradients reach
  only the hypernetwork parameters. After the optimizer step, recurrent mode sets
  ``S <- F.detach()`` (paper Eqs. 4-6); reparam mode keeps ``S``; anchored mode generates
  ``F = S0 + scale * H(S)`` and sets ``S <- F``. A method's output mask (AdaLoRA's keep-mask)
  multiplies the generated values in the forward and the next state.

An :class:`~hyperadalora.AdaptedModel` always holds one source (``model.source``); nothing
outside this module asks which one it is. Both implement :class:`FactorSource`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import sharding
from .allocation.compaction import slice_parameter_
from .hyper.network import KindHypernetwork
from .hyper.tokens import TokenLayout, from_rank_width, rank_width_shape, to_rank_width

if TYPE_CHECKING:
    from .config import AdapterConfig, HyperConfig
    from .layers import AdaptedLinear
    from .methods import AdapterMethod

GroupKey = tuple[str, tuple[int, ...]]


class FactorSource(Protocol):
    """What the model, the allocator, checkpoints and DDP ask of a factor source.

    Attributes:
        monotone_masking: Whether pruned rank components must be masked in the forward pass
            (generated values have no parameter to zero in place, so a pruned value never
            comes back).
        per_step: Whether factors are generated once per optimizer step (``generate="per_step"``).
        grad_sync: A hook averaging generated factors' gradients across data-parallel ranks
            (installed by :func:`~hyperadalora.integrations.distributed.prepare_ddp`), or ``None``.
        synced_generation: Set by that hook to the generation it last averaged.
    """

    monotone_masking: bool
    per_step: bool
    grad_sync: Callable[[], object] | None
    synced_generation: object

    def prepare_training_forward(self) -> None:
        """Called before every training forward with gradients (generates factors if needed)."""

    def values_and_grads(self, kind: str, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Values of ``kind`` and their gradients for layers ``idx``, stacked in ``idx`` order."""

    def check_gradients(self) -> None:
        """Raises a clear error if no gradient of any factor exists (allocation would be blind)."""

    def sync_gradients(self) -> None:
        """Runs :attr:`grad_sync` when installed (data parallel: the same dL/dF on every rank)."""

    def scale_values_(self, kind: str, masks: torch.Tensor) -> None:
        """Multiplies the trained values of ``kind`` by ``masks`` (per layer, ``(r_i,)``) in place
        (a no-op when values are generated and masked in the forward instead)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to save, keyed as on disk (live tensors)."""

    def compact(self, keeps: list[torch.Tensor], rank_axes: dict[str, int],
                optimizer: torch.optim.Optimizer | None) -> None:
        """Cuts every layer's factors (and their optimizer state) to the components ``keeps[i]``
        (bool ``(r_i,)``) marks, along each kind's rank axis."""

    def after_step(self) -> None:
        """Work after the optimizer step (recurrent state update)."""

    def invalidate(self) -> None:
        """Drops cached generated factors (after a step or a mode change)."""

    def set_task(self, index: int) -> None:
        """Generates the factors of task ``index`` from now on (``HyperConfig.task_embeddings``)."""

    def backward_hypernetworks(self) -> bool:
        """``per_step``: sends the accumulated gradients into the hypernetworks; whether it did."""

    def hypernetwork_parameters(self) -> list[nn.Parameter]:
        """Parameters of the hypernetworks (empty for the direct source)."""

    def generated_tensors(self) -> dict[GroupKey, torch.Tensor] | None:
        """The tensors whose ``.grad`` holds ``dL/dF`` this step (``None``: nothing generated)."""

    def ddp_ignored_tensors(self) -> list[torch.Tensor]:
        """Buffers and parameters DDP must leave alone (states; per_step hypernetworks)."""

    def summary(self, arch: str) -> str | None:
        """A line for ``print_trainable_parameters`` (``None``: nothing to add)."""


class DirectSource:
    """Factors are the layers' own ``nn.Parameter`` entries (``layer.factors``)."""

    monotone_masking = False
    per_step = False

    def __init__(self, layers: dict[str, AdaptedLinear]) -> None:
        self.names = list(layers)
        self.layer_list = list(layers.values())
        self.grad_sync = None
        self.synced_generation = None

    def prepare_training_forward(self) -> None:
        pass

    def values_and_grads(self, kind, idx):
        params = [self.layer_list[i].factors[kind] for i in idx]
        # Sharded (FSDP2): whole values and gradients on every rank, so every rank scores alike.
        values = torch.stack([sharding.full(p.detach()) for p in params])
        grads = torch.stack([sharding.full(p.grad) if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype,
                             device=p.device) for p in params])
        return values, grads

    def check_gradients(self) -> None:
        params = [p for layer in self.layer_list for p in layer.factors.values()]
        if all(p.grad is None for p in params):
            if any(sharding.is_deepspeed_managed(p) for p in params):
                raise sharding.PartitionedParameterError(
                    "after_step() found no gradients on the adapter factors, which DeepSpeed manages: ZeRO-2/3 keep "
                    "gradients in DeepSpeed's own partitioned buffers, where the rank allocator cannot score them. "
                    "Use FSDP2 (hyperadalora.integrations.distributed.shard), DDP, or ZeRO-1")
            raise RuntimeError(
                "after_step() found no gradients on the adapter factors: call it after optimizer.step() and "
                "before optimizer.zero_grad() (the importance scores need this step's gradients)"
            )

    def sync_gradients(self) -> None:
        pass  # DDP has already averaged p.grad

    @torch.no_grad()
    def scale_values_(self, kind, masks):
        values = [layer.factors[kind] for layer in self.layer_list]
        if any(sharding.is_sharded(v) for v in values):  # FSDP2: each rank masks its own shard
            for v, m in zip(values, masks):
                sharding.mul_(v.data, m)
            return
        torch._foreach_mul_([v.data for v in values], list(masks))  # as peft zeroes lam

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{kind}": t for name, layer in zip(self.names, self.layer_list)
                for kind, t in layer.factors.items()}

    def compact(self, keeps, rank_axes, optimizer) -> None:
        for layer, keep in zip(self.layer_list, keeps):
            index = keep.nonzero().flatten()
            for kind, param in layer.factors.items():
                slice_parameter_(param, index, rank_axes[kind], optimizer)

    def after_step(self) -> None:
        pass

    def invalidate(self) -> None:
        pass

    def set_task(self, index: int) -> None:
        raise ValueError("task embeddings condition the hypernetworks: multi-task training needs "
                         "adapter.source='hyper' with adapter.hyper.task_embeddings set to the number of tasks")

    def backward_hypernetworks(self) -> bool:
        return False

    def hypernetwork_parameters(self) -> list[nn.Parameter]:
        return []

    def generated_tensors(self):
        return None

    def ddp_ignored_tensors(self) -> list[torch.Tensor]:
        return []

    def summary(self, arch: str) -> str | None:
        return None


class GeneratedFactors:
    """A layer's factor provider: its slice of the source's generated factors.

    A plain object rather than a closure, so that ``copy.deepcopy`` of a wrapped model points
    the copied layers at the copied source (a lambda would keep reading the original).
    """

    def __init__(self, source: HyperSource, index: int) -> None:
        self.source, self.index = source, index

    def __call__(self) -> dict[str, torch.Tensor]:
        return self.source.factors_for(self.index)


class HyperSource(nn.Module):
    """Generates the factors of every adapted layer with one hypernetwork per factor kind.

    Args:
        layers: Adapted layers by name (their direct factors are taken over as initial states).
        method: The adapter method (its factor kinds, rank axes, singular-value kind and masks).
        config: Hypernetwork settings.
    """

    monotone_masking = True

    def __init__(self, layers: dict[str, AdaptedLinear], method: AdapterMethod, config: HyperConfig) -> None:
        super().__init__()
        self.config = config
        self.method = method
        self.layout = TokenLayout.from_config(config)
        self.layer_list = list(layers.values())
        self.kinds = method.factor_kinds
        self.groups: dict[GroupKey, list[int]] = {}
        self.group_names: dict[GroupKey, str] = {}
        self._take_over_factors()
        self.nets = nn.ModuleDict({kind: self._build_net(kind) for kind in self.kinds})
        if config.task_embeddings:
            for net in self.nets.values():
                net.add_task_embeddings(config.task_embeddings)
        # Built on the CPU (the seeded generator); they run where the states (the model) are.
        self.nets.to(next(iter(self.buffers())).device)
        self.generated: dict[GroupKey, torch.Tensor] | None = None
        # generate="per_step": the detached leaves the model reads (their .grad accumulates over micro-batches).
        self.leaves: dict[GroupKey, torch.Tensor] | None = None
        self._flushed = False
        self._per_layer: list[dict[str, torch.Tensor]] | None = None
        self._cache_grad_mode: bool | None = None
        # Set by integrations.distributed.prepare_ddp: averages dL/dF across data-parallel ranks
        # before it is used (backward_hypernetworks, allocator scores). None: single process.
        self.grad_sync = None
        self.synced_generation = None
        for i, layer in enumerate(self.layer_list):
            layer.set_factor_provider(GeneratedFactors(self, i))
            layer.mask_in_forward = True  # a pruned component is zero in every forward pass

    def _take_over_factors(self) -> None:
        """States: the direct factors, stacked per group; the layers stop owning parameters."""
        states = {(i, kind): layer.factors[kind].detach() for i, layer in enumerate(self.layer_list)
                  for kind in self.kinds}
        self._register_groups(states, states if self.config.mode == "anchored" else None)
        for layer in self.layer_list:
            for kind in self.kinds:
                del layer.factors[kind]

    def _register_groups(self, states: dict[tuple[int, str], torch.Tensor],
                         anchors: dict[tuple[int, str], torch.Tensor] | None) -> None:
        """Groups ``(layer index, kind) -> tensor`` by (kind, shape) and registers their stacked buffers."""
        for name in self.group_names.values():  # the old groups' buffers (compaction re-groups)
            for prefix in ("state_", "anchor_", "ids_"):
                if hasattr(self, prefix + name):
                    delattr(self, prefix + name)
        self.groups = {}
        for i in range(len(self.layer_list)):
            for kind in self.kinds:
                self.groups.setdefault((kind, tuple(states[(i, kind)].shape)), []).append(i)
        self.group_names = {key: f"{key[0]}_{'x'.join(map(str, key[1]))}" for key in self.groups}
        for key, idx in self.groups.items():
            name = self.group_names[key]
            self.register_buffer(f"state_{name}", torch.stack([states[(i, key[0])] for i in idx]).clone())
            if anchors is not None:
                self.register_buffer(f"anchor_{name}", torch.stack([anchors[(i, key[0])] for i in idx]).clone())
            self.register_buffer(f"ids_{name}", torch.tensor(idx, device=self.state(key).device), persistent=False)

    def _build_net(self, kind: str) -> KindHypernetwork:
        dims, max_gr, max_gw = set(), 1, 1
        for k, shape in self.groups:
            if k != kind:
                continue
            rank, width = rank_width_shape(shape, self.method.rank_axes[k])
            dims.add(self.layout.token_dim(rank, width))
            gr, gw = self.layout.grid(rank, width)
            max_gr, max_gw = max(max_gr, gr), max(max_gw, gw)
        return KindHypernetwork(kind, self.config, self.layout, dims, len(self.layer_list), max_gr, max_gw,
                                singular_values=kind == self.method.singular_value_kind)

    # -- states ------------------------------------------------------------------------------
    def state(self, key: GroupKey) -> torch.Tensor:
        """The stacked state of a group, ``(n, *shape)``."""
        return getattr(self, f"state_{self.group_names[key]}")

    def module_ids(self, key: GroupKey) -> torch.Tensor:
        """Indices of the group's modules (for the context embeddings)."""
        return getattr(self, f"ids_{self.group_names[key]}")

    @torch.no_grad()
    def reset_state(self, key: GroupKey, value: torch.Tensor) -> None:
        """Sets a group's state (and, in anchored mode, its anchor) as if it were the initial one."""
        self.state(key).copy_(value)
        self.anchor(key).copy_(value)
        self.invalidate()

    def anchor(self, key: GroupKey) -> torch.Tensor:
        """What the generated residual is added to: the initial state (anchored mode) or the state."""
        name = f"anchor_{self.group_names[key]}"
        return getattr(self, name) if hasattr(self, name) else self.state(key)

    def output_masks(self, key: GroupKey) -> torch.Tensor | None:
        """The method's keep-masks of a group's modules ``(n, r)`` (``None``: the kind has none)."""
        masks = [self.method.output_mask(self.layer_list[i], key[0]) for i in self.groups[key]]
        return None if masks[0] is None else torch.stack(masks)

    # -- generation ----------------------------------------------------------------------------
    def generate_group(self, key: GroupKey) -> torch.Tensor:
        """``F = A + scale * H_kind(S)`` for every module of one group, ``(n, *shape)``.

        ``A`` is the anchor: the state ``S`` itself (recurrent, reparam) or the initial state
        (anchored mode).
        """
        kind, shape = key
        axis = self.method.rank_axes[kind]
        view = to_rank_width(self.state(key), axis)  # (n, rank, width)
        rank, width = view.shape[1:]
        tokens = self.layout.cut(view)  # (n, T, D)
        delta = self.nets[kind](tokens, self.module_ids(key), self.layout.grid(rank, width))
        # An output mask (AdaLoRA's keep-mask) multiplies the generated values in the layer.
        return self.anchor(key) + from_rank_width(self.layout.uncut(delta, rank, width), axis, len(shape))

    @property
    def per_step(self) -> bool:
        return self.config.generate == "per_step"

    def prepare_training_forward(self) -> None:
        # per_forward: a fresh graph per training forward; per_step: once per optimizer step.
        if not (self.per_step and self.has_generated()):
            self.regenerate()

    def regenerate(self) -> None:
        """Generates every group now (one hypernetwork call per (kind, shape) group)."""
        if self.config.checkpointing and torch.is_grad_enabled():
            # Keeps only the states and anchors; the backward recomputes the hypernetwork's activations.
            generated = {key: checkpoint(self.generate_group, key, use_reentrant=False) for key in self.groups}
        else:
            generated = {key: self.generate_group(key) for key in self.groups}
        used, self.leaves = generated, None
        if torch.is_grad_enabled():
            if self.per_step:
                # The model reads leaves; backward_hypernetworks() sends their summed grads through H once.
                self.leaves = {key: t.detach().requires_grad_(True) for key, t in generated.items()}
                used = self.leaves
            else:
                for t in generated.values():
                    if t.requires_grad:
                        t.retain_grad()  # the allocator's importance scores read dL/dF
        per_layer: list[dict[str, torch.Tensor]] = [{} for _ in self.layer_list]
        for key, t in used.items():
            for pos, i in enumerate(self.groups[key]):
                per_layer[i][key[0]] = t[pos]
        self.generated, self._per_layer = generated, per_layer
        self._cache_grad_mode = torch.is_grad_enabled()
        self._flushed = False

    def has_generated(self) -> bool:
        """Whether factors for the current optimizer step exist (with a graph in training)."""
        return self._per_layer is not None and self._cache_grad_mode is True

    def backward_hypernetworks(self) -> bool:
        """``per_step``: backpropagates the gradients accumulated on the generated factors into the
        hypernetworks (one backward per step, whatever the number of micro-batches).

        Returns:
            Whether anything was backpropagated (``False`` for ``per_forward`` or when already done).
        """
        if not self.per_step or self.leaves is None or self._flushed:
            return False
        self.sync_gradients()
        pairs = [(self.generated[k], leaf.grad) for k, leaf in self.leaves.items()
                 if leaf.grad is not None and self.generated[k].requires_grad]
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        self._flushed = True
        return bool(pairs)

    def generated_tensors(self) -> dict[GroupKey, torch.Tensor] | None:
        if self.generated is None:
            return None
        return self.leaves if self.leaves is not None else self.generated

    def gradients(self) -> dict[GroupKey, torch.Tensor | None]:
        """``dL/dF`` of every group (accumulated over the step's micro-batches for ``per_step``)."""
        tensors = self.generated_tensors()
        return {} if tensors is None else {key: t.grad for key, t in tensors.items()}

    def invalidate(self) -> None:
        """Drops the generated factors (after a step or a mode change)."""
        self.generated = self._per_layer = self.leaves = None
        self._cache_grad_mode = None

    def set_task(self, index: int) -> None:
        """Generates the factors of task ``index`` from now on (drops what was generated for another).

        Raises:
            ValueError: ``index`` is not below ``HyperConfig.task_embeddings``.
        """
        count = self.config.task_embeddings
        valid = isinstance(index, int) and not isinstance(index, bool) and 0 <= index < count
        if not valid:
            raise ValueError(f"set_task({index!r}): this adapter has hyper.task_embeddings={count}; "
                             + ("set it to the number of tasks to train several" if count == 0
                                else f"use a task index from 0 to {count - 1}"))
        if all(net.task == index for net in self.nets.values()):
            return
        for net in self.nets.values():
            net.task = index
        self.invalidate()

    def factors_for(self, index: int) -> dict[str, torch.Tensor]:
        """The generated factors of layer ``index`` (generating them if needed)."""
        if self._per_layer is None or self._cache_grad_mode != torch.is_grad_enabled():
            self.regenerate()
        return self._per_layer[index]

    # -- allocator support ---------------------------------------------------------------------
    def values_and_grads(self, kind: str, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Generated values and their gradients for the allocator, stacked in ``idx`` order."""
        if self.generated is None:
            raise RuntimeError("after_step() found no generated factors: run a training forward and backward first")
        vals = []
        all_grads = self.gradients()
        for key, members in self.groups.items():
            if key[0] != kind:
                continue
            t = self.generated[key]
            g = all_grads[key] if all_grads[key] is not None else torch.zeros_like(t)
            for pos, i in enumerate(members):
                if i in idx:
                    vals.append((idx.index(i), t[pos].detach(), g[pos]))
        vals.sort(key=lambda v: v[0])
        return torch.stack([v[1] for v in vals]), torch.stack([v[2] for v in vals])

    def check_gradients(self) -> None:
        if all(g is None for g in self.gradients().values()):
            raise RuntimeError(
                "after_step() found no gradients of the generated factors: call it after loss.backward() and "
                "optimizer.step() of a training forward"
            )

    def sync_gradients(self) -> None:
        if self.grad_sync is not None:
            self.grad_sync()

    def scale_values_(self, kind: str, masks: torch.Tensor) -> None:
        pass  # generated values are masked in the forward and in the next state instead

    # -- after the step ------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self) -> None:
        """Recurrent and anchored modes: ``S <- F`` (masked); then forget the generated factors."""
        if self.per_step and self.leaves is not None and not self._flushed and any(
                t.grad is not None for t in self.leaves.values()):
            raise RuntimeError(
                "HyperConfig.generate='per_step': the gradients of the generated factors never reached the "
                "hypernetworks, so the optimizer step changed nothing. Call model.backward_hypernetworks() after "
                "the last micro-batch's backward (before gradient clipping), or model.attach_optimizer(optimizer) "
                "once, or use generate='per_forward'.")
        for key in self.groups:
            state = self.state(key)
            if self.config.mode != "reparam" and self.generated is not None:
                state.copy_(self.generated[key].detach())
            mask = self.output_masks(key)
            if mask is not None:
                state.mul_(mask)  # a pruned component stays zero in the next state too
        self.invalidate()

    # -- persistence, optimizer, DDP, summaries ------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"hyper.{key}": t for key, t in self.state_dict().items()}

    @torch.no_grad()
    def compact(self, keeps, rank_axes, optimizer) -> None:
        """Cuts every module's states (and anchors) to its kept components and re-groups them by
        their new shapes. The hypernetworks keep their parameters (and optimizer state): with the
        ``rank`` layout a rank component is a token, so a smaller rank is a shorter sequence.
        :class:`~hyperadalora.config.AdapterConfig` allows this only for per-token bodies
        without rank-position context (``arch="mlp"``, ``context=False``), where what the kept
        tokens generate does not depend on the others."""
        anchored = self.config.mode == "anchored"
        states: dict[tuple[int, str], torch.Tensor] = {}
        anchors: dict[tuple[int, str], torch.Tensor] = {}
        for key, idx in self.groups.items():
            for pos, i in enumerate(idx):
                index = keeps[i].nonzero().flatten().to(self.state(key).device)
                states[(i, key[0])] = self.state(key)[pos].index_select(rank_axes[key[0]], index)
                if anchored:
                    anchors[(i, key[0])] = self.anchor(key)[pos].index_select(rank_axes[key[0]], index)
        self._register_groups(states, anchors if anchored else None)
        self.invalidate()

    def hypernetwork_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def ddp_ignored_tensors(self) -> list[torch.Tensor]:
        return list(self.buffers()) + (list(self.parameters()) if self.per_step else [])

    def calls_per_kind(self) -> dict[str, int]:
        """How many times each kind's hypernetwork has run (for tests and benchmarks)."""
        return {k: net.calls for k, net in self.nets.items()}

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of each kind's hypernetwork (and of its body alone)."""
        out = {}
        for kind, net in self.nets.items():
            out[kind] = sum(p.numel() for p in net.parameters())
            out[f"{kind}.body"] = sum(p.numel() for p in net.body.parameters())
        return out

    def summary(self, arch: str) -> str | None:
        counts = self.parameter_counts()
        return f"hypernetworks ({arch}): " + ", ".join(
            f"{k}: {counts[k]:,} (body {counts[k + '.body']:,})" for k in self.nets)


def build_source(layers: dict[str, AdaptedLinear], method: AdapterMethod, config: AdapterConfig) -> FactorSource:
    """The source ``config.source`` names (the hypernetworks seeded as :func:`hypernetwork_rng` says)."""
    if config.source == "hyper":
        with hypernetwork_rng(config.seed):
            return HyperSource(layers, method, config.hyper)
    return DirectSource(layers)


# Offsets the hypernetworks' seed from the adapters' (both come from AdapterConfig.seed), so that
# they do not draw the same random numbers.
HYPER_SEED_OFFSET = 0x9E3779B9


@contextlib.contextmanager
def hypernetwork_rng(seed: int | None):
    """Seeds torch's CPU generator with ``seed + HYPER_SEED_OFFSET`` for the block and restores it
    after (``None``: leaves the generator alone, like peft's unseeded init)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed + HYPER_SEED_OFFSET) % 2**63)
        yield
