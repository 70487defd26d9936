"""``wrap(model, config)``: the adapted model and its training contract (DESIGN.md section 4)."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

from .adapter_io import load_adapter_weights, save_adapter
from .allocation import RankPolicy, build_allocator, policy_decides_before_wrap
from .chunked_loss import check_chunkable, chunked_causal_lm_forward
from .config import AdapterConfig
from .inject import inject_adapters, prepare_adapter_config, remove_adapters
from .layers import AdaptedLinear
from .methods import AdapterMethod, build_method
from .quant import keep_trainable_4bit_layout_
from .sources import FactorSource, HyperSource, build_source
from .transfer import initialize_from, resolve_adapter_dir


def _step_index(global_step: Any) -> int:
    """``global_step`` as an ``int``: Python / NumPy integers and 0-d integer tensors (not bools, not floats)."""
    refused = isinstance(global_step, bool) or type(global_step).__name__ == "bool_" or (
        isinstance(global_step, torch.Tensor) and (global_step.dtype == torch.bool or global_step.dim() != 0))
    try:
        step = None if refused else operator.index(global_step)
    except TypeError:
        step = None
    if step is None or step < 0:
        raise ValueError(f"after_step(global_step) needs a non-negative int, got {global_step!r}")
    return step


class AdaptedModel(nn.Module):
    """A Hugging Face model with adapters injected; behaves like the wrapped model.

    In training mode ``model(**batch).loss`` already includes the method's regulariser (AdaLoRA's
    orthogonality term, weight ``config.gamma``). After every optimizer step call
    :meth:`after_step` (before ``optimizer.zero_grad()``): it runs rank allocation, the factor
    source's state update and the method's own step (DyLoRA's rank sampling). Attribute access
    falls through to the wrapped model, so ``model.config`` or ``model.generate(...)`` work as
    before.

    Attributes:
        model: The wrapped (now adapted) model.
        adapter_config: The configuration used.
        adapted_layers: ``{module name: AdaptedLinear}`` in model order.
        method: The adapter method object shared by every layer.
        source: The factor source (:class:`~hyperadalora.sources.DirectSource` or
            :class:`~hyperadalora.sources.HyperSource`); never ``None``.
        allocator: The rank-allocation policy (``allocator.adaptive`` is ``False`` for methods
            whose ranks are fixed).
        last_task_loss: Task loss of the last training forward (without the regulariser).
        last_regularizer: Unweighted regulariser of the last training forward.
        loss_chunk_tokens: ``> 0``: a causal LM's loss is taken that many positions at a time,
            never holding the whole logits (:meth:`enable_chunked_loss`); ``0``: the model's own.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        if not isinstance(config, AdapterConfig):
            raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
        if policy_decides_before_wrap(config):
            raise ValueError(f"allocator.policy={config.allocator.policy!r} decides the ranks before the adapters are "
                             "created: wrap with calibration batches (wrap(model, config, calibration=batches)) or set "
                             "AdapterConfig.rank_pattern")
        self.model = model
        self.adapter_config = config
        self.method: AdapterMethod = build_method(config)
        self.adapted_layers: dict[str, AdaptedLinear] = inject_adapters(model, config, self.method)
        self.source: FactorSource = build_source(self.adapted_layers, self.method, config)
        self.allocator: RankPolicy = build_allocator(self.adapted_layers, config.allocator, self.method, self.source)
        self.last_task_loss: float | None = None
        self.last_regularizer: float | None = None
        self.loss_chunk_tokens = 0
        self._train_forwards = 0
        self._steps_taken = 0
        self.method.bind_layers(self.layer_list)

    @property
    def layer_list(self) -> list[AdaptedLinear]:
        """The adapted layers in model order."""
        return list(self.adapted_layers.values())

    @property
    def hyper(self) -> HyperSource | None:
        """The :class:`~hyperadalora.sources.HyperSource` when ``source == "hyper"``, else ``None``
        (read-only, for inspection; the library itself only talks to :attr:`source`)."""
        return self.source if isinstance(self.source, HyperSource) else None

    # -- attribute fall-through --------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["model"], name)

    # -- forward -----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> AdaptedModel:
        if not (mode and self.training):
            # Not when staying in training mode: Trainer calls model.train() before every micro-batch,
            # and generate="per_step" must keep the step's factors (and their gradients) across them.
            self.source.invalidate()
        return super().train(mode)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training and torch.is_grad_enabled():
            self.source.prepare_training_forward()
        if self.loss_chunk_tokens and not args and kwargs.get("labels") is not None:
            outputs = chunked_causal_lm_forward(self.model, self.loss_chunk_tokens, **kwargs)
        else:
            outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None) if not isinstance(outputs, tuple) else None
        if self.training and torch.is_grad_enabled():
            self._train_forwards += 1
        if self.training and isinstance(loss, torch.Tensor):
            self.last_task_loss = float(loss.detach())
            if self.uses_regularizer:
                reg = self.regularizer()
                self.last_regularizer = float(reg.detach())
                outputs.loss = loss + self.adapter_config.gamma * reg
        return outputs

    def enable_chunked_loss(self, chunk_tokens: int) -> None:
        """Takes a causal LM's training loss ``chunk_tokens`` positions at a time (:mod:`.chunked_loss`).

        The forward then returns the loss without logits whenever it is given ``labels`` (the
        gradients equal the model's own); ``0`` restores the model's own loss.

        Raises:
            ValueError: If ``chunk_tokens < 0`` or the model is not a causal LM whose loss can be chunked.
        """
        if chunk_tokens < 0:
            raise ValueError(f"chunk_tokens must be >= 0 (0: the model's own loss), got {chunk_tokens}")
        if chunk_tokens:
            check_chunkable(self.model)
        self.loss_chunk_tokens = chunk_tokens

    @property
    def uses_regularizer(self) -> bool:
        """Whether the training loss includes the method's regulariser (it has one and ``gamma > 0``)."""
        return self.method.has_regularizer and self.adapter_config.gamma > 0

    def regularizer(self) -> torch.Tensor:
        """The method's unweighted regulariser (AdaLoRA: ``||P^T P - I||`` and ``||Q Q^T - I||``,
        peft-normalised or as paper Eq. 7, ``AdapterConfig.orth_reg``).

        Raises:
            ValueError: If the method has no regulariser.
        """
        reg = self.method.regularizer(self.layer_list)
        if reg is None:
            raise ValueError(f"method {self.adapter_config.method!r} has no regulariser")
        return reg

    def orthogonality_regularizer(self) -> torch.Tensor:
        """Alias of :meth:`regularizer` (AdaLoRA's orthogonality term)."""
        return self.regularizer()

    # -- optimizer contract -------------------------------------------------------------------
    def optimizer_param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Parameter groups for a torch optimizer: hypernetworks (at ``HyperConfig.lr`` when set)
        and everything else that trains (direct factors, DoRA magnitudes, saved heads) at ``lr``.

        Args:
            lr: The learning rate of the run.
            weight_decay: Weight decay of every group.

        Returns:
            A list of groups (empty groups left out), each with a ``name`` key for logging.
        """
        hyper_ids = {id(p) for p in self.hypernetwork_parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in hyper_ids]
        hyper = [p for p in self.hypernetwork_parameters() if p.requires_grad]
        hyper_lr = self.adapter_config.hyper.lr if self.adapter_config.hyper.lr is not None else lr
        groups = [{"name": "hypernetworks", "params": hyper, "lr": hyper_lr, "weight_decay": weight_decay},
                  {"name": "adapters_and_heads", "params": rest, "lr": lr, "weight_decay": weight_decay}]
        return [g for g in groups if g["params"]]

    def backward_hypernetworks(self) -> None:
        """Sends the gradients accumulated on generated factors into the hypernetworks.

        Needed with ``HyperConfig.generate="per_step"`` (one hypernetwork forward and backward
        per optimizer step, however many micro-batches): call it after the last micro-batch's
        ``backward()`` and before gradient clipping and ``optimizer.step()``. A no-op otherwise
        and when already done for this step.
        """
        self.source.backward_hypernetworks()

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Makes ``optimizer.step()`` call :meth:`backward_hypernetworks` first (if not yet called).

        Enough for loops without gradient clipping; with clipping, call
        :meth:`backward_hypernetworks` yourself before clipping.
        """
        optimizer.register_step_pre_hook(lambda *_: self.backward_hypernetworks())

    # -- after-step contract -----------------------------------------------------------------
    def after_step(self, global_step: int) -> None:
        """Runs everything that follows an optimizer step.

        Rank allocation (AdaLoRA: importance update and masking, peft's ``update_and_allocate``,
        same step semantics), the factor source's state update (hyper, recurrent), then the
        method's own step (DyLoRA: samples the next training rank). Call it after
        ``optimizer.step()`` and before ``optimizer.zero_grad()``.

        Args:
            global_step: The step counter the budget schedule is evaluated at, counted as
                ``AllocatorConfig.total_step`` counts (peft's examples pass the 0-based loop index).
                A Python or NumPy integer or a 0-d integer tensor; each call's step must be larger
                than the previous call's (a resumed or loaded model continues after its last step).

        Raises:
            ValueError: ``global_step`` is not a non-negative integer, or not larger than the last one.
        """
        global_step = _step_index(global_step)
        self.allocator.check_step_order(global_step)
        self._steps_taken += 1
        self.allocator.update_and_allocate(global_step)
        self.source.after_step()  # recurrent state update (with the masks just decided)
        self.method.after_step(self.layer_list, global_step)

    @property
    def steps_taken(self) -> int:
        """Number of :meth:`after_step` calls so far (restored with a checkpoint)."""
        return self._steps_taken

    def restore_steps_taken(self, n: int) -> None:
        """Sets :attr:`steps_taken` when resuming a run (``n`` after_step calls already happened)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"restore_steps_taken(n) needs a non-negative int, got {n!r}")
        self._steps_taken = n

    def set_task(self, index: int) -> None:
        """Generates the adapter of task ``index`` from now on (multi-task hypernetworks:
        ``HyperConfig.task_embeddings``; :mod:`hyperadalora.train.multitask`).

        Raises:
            ValueError: A direct source, no task embeddings, or an index out of range.
        """
        self.source.set_task(index)

    def rng_state(self) -> torch.Tensor | None:
        """State of the method's own generator (DyLoRA's rank sampler; ``None`` when it draws nothing)."""
        return self.method.rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restores what :meth:`rng_state` returned (a resumed run then draws the same ranks)."""
        self.method.set_rng_state(state)

    @property
    def dylora_rank(self) -> int | None:
        """The sampled rank ``b`` the next training forward uses (DyLoRA; ``None`` for other methods)."""
        return self.method.sampled_rank(self.layer_list)

    # -- ranks ---------------------------------------------------------------------------------
    @property
    def rank_pattern(self) -> dict[str, list[bool]]:
        """``{module: [kept?] * r}`` (all ``True`` for fixed ranks and before the first allocation)."""
        return self.allocator.keep_pattern()

    @property
    def ranks(self) -> dict[str, int]:
        """Current rank of every adapted module."""
        return {n: int(sum(keep)) for n, keep in self.rank_pattern.items()}

    def compact(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Cuts the factors to the kept rank components once pruning is final (``AllocatorConfig.compact``).

        Call it after :meth:`after_step` (and before ``optimizer.zero_grad()``) with the optimizer
        that trains the factors; :func:`~hyperadalora.train.step.optimizer_step` does. The factor
        parameters stay the same objects (their ``.data`` shrinks) and their optimizer state is
        cut alike, so the optimizer needs no new parameter groups. The forward and the task loss
        are unchanged (a pruned component contributes exactly zero); the orthogonality
        regulariser then covers the kept components only. A layer left at rank 0 runs its base
        layer alone. Not for a model inside DDP (its gradient buckets have fixed sizes).

        Args:
            optimizer: The optimizer holding the factors (``None``: no optimizer state to cut).

        Returns:
            Whether the model was compacted now (``False``: disabled, not yet due, or already done).
        """
        if not self.allocator.compaction_due():
            return False
        self.compact_to(self.allocator.kept_components(), optimizer)
        return True

    def compact_to(self, keeps: list[torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Cuts every layer to the components ``keeps[i]`` (bool ``(r_i,)``) marks, now.

        Raises:
            ValueError: If the allocator does not compact (``AllocatorConfig.compact="off"``).
        """
        if not self.allocator.compaction_enabled():
            raise ValueError("compaction needs AdapterConfig.allocator.compact='final'")
        self.source.compact(keeps, self.method.rank_axes, optimizer)
        for layer, keep in zip(self.layer_list, keeps):
            self.method.compact_layer(layer, keep)
            layer.r = int(keep.sum())
        self.allocator.mark_compacted()

    def compact_to_ranks(self, ranks: dict[str, int]) -> None:
        """Cuts each module to its first ``ranks[module]`` components (loading a compacted adapter)."""
        for name, layer in self.adapted_layers.items():
            if not 0 <= ranks[name] <= layer.r:
                raise ValueError(f"module {name!r}: saved rank {ranks[name]} is not within 0..{layer.r}")
        self.compact_to([torch.arange(layer.r) < ranks[name] for name, layer in self.adapted_layers.items()])

    @property
    def budget(self) -> int:
        """The current total rank budget (the sum of ranks for fixed-rank methods)."""
        return self.allocator.budget

    # -- merge / unwrap ------------------------------------------------------------------------
    def merge(self) -> None:
        """Folds every adapter into its base weight; the forward then runs the base layers only."""
        for layer in self.adapted_layers.values():
            layer.merge()

    def unmerge(self) -> None:
        """Undoes :meth:`merge`."""
        for layer in self.adapted_layers.values():
            layer.unmerge()

    def unwrap(self, merge: bool = False) -> nn.Module:
        """Removes the adapters and returns the plain model (with the updates folded in if ``merge``)."""
        return remove_adapters(self.model, self.adapted_layers, merge)

    # -- summaries -----------------------------------------------------------------------------
    def hypernetwork_parameters(self) -> list[nn.Parameter]:
        """The hypernetworks' parameters (empty for the direct source)."""
        return self.source.hypernetwork_parameters()

    def trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> str:
        """Prints and returns peft's one-line summary of trainable parameters."""
        trainable, total = self.trainable_parameters()
        line = (f"trainable params: {trainable:,} || all params: {total:,} || "
                f"trainable%: {100 * trainable / max(total, 1):.4f}")
        extra = self.source.summary(self.adapter_config.hyper.arch)
        if extra is not None:
            line += "\n" + extra
        print(line)
        return line

    # -- persistence (see checkpoint.py) ------------------------------------------------------
    def save_adapter(self, directory: str) -> None:
        """Writes the adapter (safetensors + JSON config + allocator state) to ``directory``."""
        save_adapter(self, directory)

    def load_adapter_weights(self, directory: str) -> None:
        """Loads adapter weights and allocator state saved by :meth:`save_adapter` into this model."""
        load_adapter_weights(self, directory)

    def check_allocation_ran(self) -> None:
        """Raises if an adaptive allocator never ran while training (AdaLoRA would be plain LoRA)."""
        if self.allocator.adaptive and self._train_forwards > 0 and self._steps_taken == 0:
            raise RuntimeError(
                f"this AdaLoRA model ran {self._train_forwards} training forward pass(es) but after_step() was never "
                "called, so no rank was ever allocated and the adapter is effectively LoRA. Call "
                "model.after_step(global_step) after each optimizer.step() (before zero_grad())."
            )


def _refuse_wrapped(model: nn.Module) -> None:
    if isinstance(model, AdaptedModel):
        raise ValueError("wrap() got an AdaptedModel: it is already wrapped; use it as is, or wrap "
                         "model.unwrap() (or a fresh base model) to change the adapter")
    inside = next((name for name, m in model.named_modules() if isinstance(m, AdaptedLinear)), None)
    if inside is not None:
        raise ValueError(f"wrap() got a model that already holds adapter layers ({inside!r} is an AdaptedLinear): "
                         "wrap the original base model, or call unwrap() on its AdaptedModel first")


def wrap(model: nn.Module, config: AdapterConfig, calibration: Any = None) -> AdaptedModel:
    """Injects adapters into a Hugging Face (or any torch) model.

    The base model is frozen; target modules (``config.target_modules``) are replaced by
    adapter layers; ``config.modules_to_save`` stay trainable. A policy that decides ranks
    before the adapters exist (``allocator.policy="sensitivity"``) runs first on the base model
    with the ``calibration`` batches, and the adapters are created at the ranks it chose
    (``model.adapter_config.rank_pattern``).

    Args:
        model: The model to adapt (modified in place).
        config: What to adapt and how.
        calibration: Model inputs (an iterable of batch dicts) for such a policy; unused otherwise.

    Returns:
        The :class:`AdaptedModel` wrapping ``model``.

    Raises:
        ValueError: ``model`` is already wrapped (an :class:`AdaptedModel`, or holds adapter layers).
        FileNotFoundError: ``config.init_from`` holds no adapter.
    """
    _refuse_wrapped(model)
    keep_trainable_4bit_layout_(model)  # before any forward (a calibration's): see its docstring
    if config.init_from is not None:
        resolve_adapter_dir(config.init_from)  # a missing source fails before any calibration or injection
    config, _ = prepare_adapter_config(model, config, calibration)
    adapted = AdaptedModel(model, config)
    if config.init_from is not None:
        initialize_from(adapted, config.init_from)
    return adapted
