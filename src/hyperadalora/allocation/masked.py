"""What the in-training policies share: the cubic budget schedule, keep-masks and masking.

Both ``adalora`` and ``sigma-grad`` score every rank component (a singular value of the
method's ``singular_value_kind``), follow peft's cubic budget schedule from ``init_r * n`` to
``target_r * n`` between ``tinit`` and ``total_step - tfinal``, and re-mask every ``deltaT``
steps. The masks live on the layers (the method's ``output_mask``). All arithmetic is batched
over modules of equal factor shape (one ``stack`` and a handful of tensor ops per shape group per
step) instead of looping over modules in Python.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import RankPolicy


class MaskedAllocator(RankPolicy):
    """Scores and masks the rank components of every layer (subclasses define the score).

    Attributes:
        persistent: Whether a pruned component stays pruned (and exactly zero) for good.
        monotone: Whether masks only ever shrink: ``persistent``, or a source whose values are
            generated (there is no parameter to zero, so the mask acts in the forward pass and a
            pruned value never comes back; DESIGN.md section 2).
    """

    adaptive = True
    persistent: ClassVar[bool] = False

    def __init__(self, layers, config, method, source) -> None:
        super().__init__(layers, config, method, source)
        self.target_bgt = config.target_r * len(self.layers)
        self.kind = method.singular_value_kind
        # Shape groups: (kind, shape) -> indices of layers; one batched op per group.
        self.groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for i, layer in enumerate(self.layers):
            for kind, shape in method.factor_shapes(layer.out_features, layer.in_features, layer.r).items():
                self.groups.setdefault((kind, tuple(shape)), []).append(i)
        # Mixed initial ranks (a rank_pattern, e.g. Sensitivity-LoRA with then=adalora): masks and
        # scores are (n_layers, r_max), padded past each layer's rank; padding never counts as live.
        self.r_max = max((layer.r for layer in self.layers), default=0)
        ranks = torch.tensor([layer.r for layer in self.layers])
        self.exists = torch.arange(self.r_max)[None, :] < ranks[:, None]  # (n_layers, r_max)
        self.monotone = self.persistent or source.monotone_masking
        # Whether the layers were cut to their kept components (AllocatorConfig.compact): from then
        # on every component is live and nothing is scored or masked any more.
        self.compacted = False
        for layer in self.layers:
            layer.mask_in_forward = self.monotone
        self.reset_ipt()

    # -- state (scores: subclasses) ----------------------------------------------------------
    def reset_ipt(self) -> None:
        """Forgets the accumulated importance (peft does this when the final budget is fixed)."""
        raise NotImplementedError

    def score_tensors(self) -> dict[str, torch.Tensor]:
        """The score state to save (keys as on disk)."""
        raise NotImplementedError

    def load_scores(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restores what :meth:`score_tensors` returned (after :meth:`reset_ipt`)."""
        raise NotImplementedError

    def update_ipt(self) -> None:
        """Accumulates this step's importance."""
        raise NotImplementedError

    def triplet_scores(self) -> torch.Tensor:
        """Importance of each rank component, ``(n_layers, r)``."""
        raise NotImplementedError

    def after_allocation(self) -> None:
        """Called after each scheduled re-masking."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.compacted:  # ranks differ per layer; the layers' own (all-ones) masks are saved with them
            return self.score_tensors()
        return {"masks": self.masks().contiguous(), **self.score_tensors()}

    def meta_dict(self) -> dict:
        return {**super().meta_dict(), "compacted": self.compacted}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.reset_ipt()
        self.load_scores(tensors)
        self.compacted = bool(meta.get("compacted", False))
        if not self.compacted:
            self.set_masks(tensors["masks"])
        super().load_state(tensors, meta)

    # -- compaction (AllocatorConfig.compact) ------------------------------------------------------
    def compaction_enabled(self) -> bool:
        return self.config.compact != "off"

    def compaction_due(self) -> bool:
        # "final": the final budget is fixed once after_step ran at step total_step - tfinal.
        c = self.config
        return (c.compact == "final" and not self.compacted and self.rank_pattern is not None
                and self.last_step is not None and self.last_step >= c.total_step - c.tfinal)

    def kept_components(self) -> list[torch.Tensor]:
        return [self.method.output_mask(layer, self.kind) > 0 for layer in self.layers]

    def mark_compacted(self) -> None:
        self.compacted = True
        self.reset_ipt()  # scores of the old components mean nothing for the cut factors
        self.rank_pattern = {n: [True] * layer.r for n, layer in zip(self.names, self.layers)}

    def masks(self) -> torch.Tensor:
        """Current keep-masks, ``(n_layers, r_max)`` (zero past a layer's own rank)."""
        return torch.stack([pad_to(self.method.output_mask(layer, self.kind), self.r_max) for layer in self.layers])

    def set_masks(self, masks: torch.Tensor) -> None:
        """Sets every layer's keep-mask from ``(n_layers, r_max)``."""
        for layer, m in zip(self.layers, masks):
            self.method.output_mask(layer, self.kind).copy_(m[:layer.r])

    def layer_rows(self, padded: torch.Tensor) -> list[torch.Tensor]:
        """``(n_layers, r_max)`` -> one ``(r_i,)`` row per layer (the padding cut off)."""
        return [row[:layer.r] for layer, row in zip(self.layers, padded)]

    def padded_rows(self, parts: dict[tuple[str, tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
        """Per shape group ``(g, r_g)`` rows -> ``(n_layers, r_max)``, zero past each layer's rank."""
        ref = next(iter(parts.values()), torch.zeros(0))
        out = torch.zeros(len(self.layers), self.r_max, dtype=ref.dtype, device=ref.device)
        for key, rows in parts.items():
            out[torch.tensor(self.groups[key], device=rows.device), :rows.shape[1]] = rows
        return out

    def keep_pattern(self) -> dict[str, list[bool]]:
        return {n: (self.method.output_mask(layer, self.kind) > 0).tolist() for n, layer in zip(self.names, self.layers)}

    def total_rank(self) -> int:
        if self.compacted:
            return sum(layer.r for layer in self.layers)
        return int(self.masks().sum().item())

    # -- schedule ----------------------------------------------------------------------------
    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """peft's cubic schedule: ``(budget, whether to re-mask at this step)``."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % c.deltaT == 0

    def _values_and_grads(self, kind: str, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source.values_and_grads(kind, idx)

    def _prepare_grads(self) -> None:
        self.source.check_gradients()
        self.source.sync_gradients()  # data parallel: the same dL/dF on every rank

    # -- masking -----------------------------------------------------------------------------
    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Keeps the ``budget`` most important components (policy permitting)."""
        scores = self.triplet_scores()
        if self.monotone:  # prune the lowest-scoring live values until the budget is met
            live = self.masks() > 0
            to_prune = int(live.sum().item()) - budget
            if to_prune > 0:
                masked = scores.masked_fill(~live, float("inf")).flatten()
                order = torch.argsort(masked, stable=True)[:to_prune]
                flat = live.flatten().clone()
                flat[order] = False
                live = flat.view_as(live)
            keep = live
        else:
            exists = self.exists.to(scores.device)
            k = self.init_bgt - budget
            if k <= 0:
                keep = exists.clone()
            else:  # padding sorts first, so the k-th smallest real score is the threshold
                padding = int((~exists).sum())
                threshold = torch.kthvalue(scores.masked_fill(~exists, float("-inf")).flatten(), k=k + padding)[0].item()
                keep = ~(scores <= threshold) & exists
        self._apply_keep(keep)
        self.rank_pattern = {name: row.tolist() for name, row in zip(self.names, self.layer_rows(keep.cpu()))}
        return self.rank_pattern

    def _apply_keep(self, keep: torch.Tensor) -> None:
        if self.monotone:
            keep = keep & (self.masks() > 0)
        masks = keep.to(self.masks().dtype)
        self.source.scale_values_(self.kind, self.layer_rows(masks))  # trained values: zeroed in place, as peft does
        self.set_masks(masks)

    @torch.no_grad()
    def update_and_allocate(self, global_step: int) -> int:
        """One allocation step, with peft's ``update_and_allocate`` semantics.

        Call after ``optimizer.step()`` and before ``optimizer.zero_grad()``.

        Returns:
            The budget in force after this step.
        """
        c = self.config
        self.steps_seen += 1
        self.last_step = global_step
        final = c.total_step - c.tfinal
        if self.compacted:  # every remaining component is kept for good
            return self.budget
        if global_step < final:
            self.update_ipt()
            budget, mask_ind = self.budget_schedule(global_step)
            if mask_ind:
                self.mask_to_budget(budget)
                self.after_allocation()
            self.budget = budget
        elif global_step == final:
            self.mask_to_budget(self.target_bgt)
            self.budget = self.target_bgt
            self.reset_ipt()
        elif self.rank_pattern is not None:
            keep = torch.stack([pad_to(torch.tensor(self.rank_pattern[n]), self.r_max) for n in self.names])
            self._apply_keep(keep.to(self.masks().device))
        if self.persistent:  # optimizer momentum must not revive a pruned trained value
            self.source.scale_values_(self.kind, self.layer_rows((self.masks() > 0).to(self.masks().dtype)))
        return self.budget


def pad_to(row: torch.Tensor, length: int) -> torch.Tensor:
    """``row`` (1-D) padded with zeros (``False``) to ``length``."""
    return torch.nn.functional.pad(row, (0, length - row.numel()))
