"""``wrap(model, config)``: the adapted model and its training contract (DESIGN.md section 4)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .allocation import RankAllocator
from .config import AdapterConfig
from .hyper.source import HyperFactorSource
from .inject import inject_adapters, remove_adapters
from .layers import AdaptedLinear
from .methods import orthogonality_penalty


# Offsets the hypernetworks' seed from the adapters' (both come from AdapterConfig.seed), so that
# they do not draw the same random numbers.
_HYPER_SEED_OFFSET = 0x9E3779B9


@contextlib.contextmanager
def _hypernetwork_rng(seed: int | None):
    """Seeds torch's CPU generator with ``seed + _HYPER_SEED_OFFSET`` for the block and restores it
    after (``None``: leaves the generator alone, like peft's unseeded init)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed + _HYPER_SEED_OFFSET) % 2**63)
        yield


class AdaptedModel(nn.Module):
    """A Hugging Face model with adapters injected; behaves like the wrapped model.

    In training mode ``model(**batch).loss`` already includes the orthogonality regulariser
    (AdaLoRA family, weight ``config.gamma``). After every optimizer step call
    :meth:`after_step` (before ``optimizer.zero_grad()``): it runs rank allocation (AdaLoRA)
    and samples the next DyLoRA rank. Attribute access falls through to the wrapped model, so
    ``model.config`` or ``model.generate(...)`` work as before.

    Attributes:
        model: The wrapped (now adapted) model.
        adapter_config: The configuration used.
        adapted_layers: ``{module name: AdaptedLinear}`` in model order.
        allocator: The :class:`RankAllocator` (AdaLoRA only, else ``None``).
        last_task_loss: Task loss of the last training forward (without the regulariser).
        last_regularizer: Unweighted regulariser of the last training forward.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        if not isinstance(config, AdapterConfig):
            raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
        self.model = model
        self.adapter_config = config
        self.adapted_layers: dict[str, AdaptedLinear] = inject_adapters(model, config)
        # The factor source: direct (each layer's own parameters) or one hypernetwork per kind.
        self.hyper: HyperFactorSource | None = None
        if config.source == "hyper":
            method = next(iter(self.adapted_layers.values())).method
            with _hypernetwork_rng(config.seed):
                self.hyper = HyperFactorSource(self.adapted_layers, method.factor_kinds, config.hyper)
        self.allocator = (RankAllocator(self.adapted_layers, config.allocator, source=self.hyper)
                          if config.is_adalora else None)
        self._dylora_gen = torch.Generator().manual_seed(config.seed if config.seed is not None else 0)
        self.last_task_loss: float | None = None
        self.last_regularizer: float | None = None
        self._train_forwards = 0
        self._after_step_calls = 0
        if config.method == "dylora":
            self._sample_dylora_rank()

    # -- attribute fall-through --------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["model"], name)

    # -- forward -----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> AdaptedModel:
        if self.hyper is not None and not (mode and self.training):
            # Not when staying in training mode: Trainer calls model.train() before every micro-batch,
            # and generate="per_step" must keep the step's factors (and their gradients) across them.
            self.hyper.invalidate()
        return super().train(mode)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.hyper is not None and self.training and torch.is_grad_enabled():
            # per_forward: a fresh graph per training forward; per_step: once per optimizer step.
            if not (self.hyper.per_step and self.hyper.has_generated()):
                self.hyper.regenerate()
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None) if not isinstance(outputs, tuple) else None
        if self.training and torch.is_grad_enabled():
            self._train_forwards += 1
        if self.training and isinstance(loss, torch.Tensor):
            self.last_task_loss = float(loss.detach())
            if self.adapter_config.is_adalora and self.adapter_config.gamma > 0:
                reg = self.orthogonality_regularizer()
                self.last_regularizer = float(reg.detach())
                outputs.loss = loss + self.adapter_config.gamma * reg
        return outputs

    def orthogonality_regularizer(self) -> torch.Tensor:
        """Unweighted ``R = sum/mean of ||P^T P - I|| and ||Q Q^T - I||`` over AdaLoRA layers.

        ``orth_reg="peft"`` (default): mean over all 2n factor matrices of the Frobenius norm,
        exactly as peft computes it. ``orth_reg="paper"``: sum over modules of squared norms
        (HyperAdaLoRA Eq. 7).
        """
        layers = list(self.adapted_layers.values())
        squared = self.adapter_config.orth_reg == "paper"
        factors = [layer.get_factors() for layer in layers]
        p_pen = orthogonality_penalty([f["P"] for f in factors], transpose_first=True, squared=squared)
        q_pen = orthogonality_penalty([f["Q"] for f in factors], transpose_first=False, squared=squared)
        if squared:
            return p_pen.sum() + q_pen.sum()
        return (p_pen.sum() + q_pen.sum()) / (2 * len(layers))

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
        if self.hyper is not None:
            self.hyper.backward_hypernetworks()

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Makes ``optimizer.step()`` call :meth:`backward_hypernetworks` first (if not yet called).

        Enough for loops without gradient clipping; with clipping, call
        :meth:`backward_hypernetworks` yourself before clipping.
        """
        optimizer.register_step_pre_hook(lambda *_: self.backward_hypernetworks())

    # -- after-step contract -----------------------------------------------------------------
    def after_step(self, global_step: int) -> None:
        """Runs everything that follows an optimizer step.

        AdaLoRA: importance update and rank allocation (peft's ``update_and_allocate``, same
        step semantics); DyLoRA: samples the next training rank. Call it after ``optimizer.step()`` and before
        ``optimizer.zero_grad()``, with the 0-based index of the step just taken... or the
        1-based count, as long as it matches ``AllocatorConfig.total_step`` (peft's examples pass
        the 0-based loop index).

        Args:
            global_step: The step counter the budget schedule is evaluated at, counted as
                ``AllocatorConfig.total_step`` counts (peft's examples pass the loop index).
        """
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"after_step(global_step) needs a non-negative int, got {global_step!r}")
        self._after_step_calls += 1
        if self.allocator is not None:
            self.allocator.update_and_allocate(global_step)
        if self.hyper is not None:
            self.hyper.after_step()  # recurrent state update (with the masks just decided)
        if self.adapter_config.method == "dylora":
            self._sample_dylora_rank()

    # Shim until the core branch (which adds the same two members) merges.
    @property
    def steps_taken(self) -> int:
        """How many times :meth:`after_step` ran (optimizer steps taken by this model)."""
        return self._after_step_calls

    def restore_steps_taken(self, n: int) -> None:
        """Sets :attr:`steps_taken` back to ``n`` (resuming from a training checkpoint)."""
        self._after_step_calls = int(n)

    def _sample_dylora_rank(self) -> None:
        b = int(torch.randint(1, self.adapter_config.r + 1, (1,), generator=self._dylora_gen))
        for layer in self.adapted_layers.values():
            layer.dylora_b = b

    @property
    def dylora_rank(self) -> int | None:
        """The DyLoRA rank ``b`` used by the next training forward (``None`` for other methods)."""
        if self.adapter_config.method != "dylora":
            return None
        return next(iter(self.adapted_layers.values())).dylora_b

    # -- ranks ---------------------------------------------------------------------------------
    @property
    def rank_pattern(self) -> dict[str, list[bool]]:
        """``{module: [kept?] * r}`` for AdaLoRA (all ``True`` before the first allocation)."""
        if self.allocator is None:
            return {n: [True] * layer.r for n, layer in self.adapted_layers.items()}
        return {n: (layer.rank_mask > 0).tolist() for n, layer in self.adapted_layers.items()}

    @property
    def ranks(self) -> dict[str, int]:
        """Current rank of every adapted module."""
        return {n: int(sum(keep)) for n, keep in self.rank_pattern.items()}

    @property
    def budget(self) -> int:
        """The current total rank budget (sum of ranks for non-AdaLoRA methods)."""
        if self.allocator is None:
            return sum(layer.r for layer in self.adapted_layers.values())
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
        return [] if self.hyper is None else list(self.hyper.parameters())

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
        if self.hyper is not None:
            counts = self.hyper.parameter_counts()
            line += "\nhypernetworks (" + self.adapter_config.hyper.arch + "): " + ", ".join(
                f"{k}: {counts[k]:,} (body {counts[k + '.body']:,})" for k in self.hyper.nets)
        print(line)
        return line

    # -- persistence (see checkpoint.py) ------------------------------------------------------
    def save_adapter(self, directory: str) -> None:
        """Writes the adapter (safetensors + JSON config + allocator state) to ``directory``."""
        from .checkpoint import save_adapter

        save_adapter(self, directory)

    def load_adapter_weights(self, directory: str) -> None:
        """Loads adapter weights and allocator state saved by :meth:`save_adapter` into this model."""
        from .checkpoint import load_adapter_weights

        load_adapter_weights(self, directory)

    def check_allocation_ran(self) -> None:
        """Raises if AdaLoRA trained without its allocator ever running (it would be plain LoRA)."""
        if self.allocator is not None and self._train_forwards > 0 and self._after_step_calls == 0:
            raise RuntimeError(
                f"this AdaLoRA model ran {self._train_forwards} training forward pass(es) but after_step() was never "
                "called, so no rank was ever allocated and the adapter is effectively LoRA. Call "
                "model.after_step(global_step) after each optimizer.step() (before zero_grad())."
            )


def wrap(model: nn.Module, config: AdapterConfig) -> AdaptedModel:
    """Injects adapters into a Hugging Face (or any torch) model.

    The base model is frozen; target modules (``config.target_modules``) are replaced by
    adapter layers; ``config.modules_to_save`` stay trainable.

    Args:
        model: The model to adapt (modified in place).
        config: What to adapt and how.

    Returns:
        The :class:`AdaptedModel` wrapping ``model``.
    """
    return AdaptedModel(model, config)
