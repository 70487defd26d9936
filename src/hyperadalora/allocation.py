"""AdaLoRA rank allocation: importance scores, the cubic budget schedule and masks.

Two policies (DESIGN.md section 1):

* ``adalora`` reproduces peft's ``RankAllocator`` step for step: per element the sensitivity
  ``|w * dL/dw|`` is smoothed (``beta1``) and its uncertainty tracked (``beta2``); a triplet
  (P column, lam_i, Q row) scores ``s(lam_i) + mean s(Q_i,:) + mean s(P_:,i)``; at allocation
  steps every lam whose score is at or below the (init_bgt - budget)-th smallest is zeroed in
  place. A zeroed lam keeps training and may come back at the next allocation, as in peft.
* ``sigma-grad`` (HyperAdaLoRA, Appendix D): the score of a singular value is ``|lam * dL/dlam|``
  accumulated since the last allocation; at each allocation step the lowest-scoring live values
  are pruned until the scheduled budget is met, and a pruned value stays exactly zero.

All arithmetic is batched over modules of equal factor shape (one ``stack`` and a handful of
tensor ops per shape group per step) instead of looping over modules in Python.
"""

from __future__ import annotations

import torch

from .config import AllocatorConfig
from .layers import AdaptedLinear


class RankAllocator:
    """Scores and masks the singular values of every AdaLoRA layer of a model.

    Args:
        layers: The AdaLoRA layers by module name, in model order.
        config: Schedule and policy.

    Attributes:
        budget: The rank budget (sum of live singular values) as of the last call.
        rank_pattern: ``{module name: [bool] * r}``, ``True`` where the singular value is kept,
            as of the last allocation (``None`` before the first one).
        steps_seen: Number of ``update_and_allocate`` calls so far.
    """

    def __init__(self, layers: dict[str, AdaptedLinear], config: AllocatorConfig, source=None) -> None:
        self.config = config
        self.source = source  # a HyperFactorSource, or None for direct (parameter) factors
        self.names = list(layers)
        self.layers = list(layers.values())
        self.init_bgt = sum(layer.r for layer in self.layers)
        self.target_bgt = config.target_r * len(self.layers)
        self.budget = self.init_bgt
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.steps_seen = 0
        self.last_step: int | None = None
        # Shape groups: (kind, shape) -> indices of layers; one batched op per group.
        self.groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for i, layer in enumerate(self.layers):
            for kind, shape in layer.method.factor_shapes(layer.out_features, layer.in_features, layer.r).items():
                self.groups.setdefault((kind, tuple(shape)), []).append(i)
        self.persistent = config.policy == "sigma-grad"
        # Generated factors have no parameter to zero: the mask acts in the forward pass, and a
        # pruned value never comes back (DESIGN.md section 2).
        self.monotone = self.persistent or source is not None
        for layer in self.layers:
            layer.mask_in_forward = self.monotone
        self.reset_ipt()

    # -- state -------------------------------------------------------------------------------
    def reset_ipt(self) -> None:
        """Forgets the smoothed importance (peft does this when the final budget is fixed)."""
        self.exp_avg_ipt: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self.sigma_score: torch.Tensor | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors of the allocator state (for checkpoints)."""
        out = {"masks": self.masks().contiguous()}
        for key, t in self.exp_avg_ipt.items():
            out[f"exp_avg_ipt/{key[0]}/{'x'.join(map(str, key[1]))}"] = t.contiguous()
        for key, t in self.exp_avg_unc.items():
            out[f"exp_avg_unc/{key[0]}/{'x'.join(map(str, key[1]))}"] = t.contiguous()
        if self.sigma_score is not None:
            out["sigma_score"] = self.sigma_score.contiguous()
        return out

    def meta_dict(self) -> dict:
        """JSON-compatible allocator state (for checkpoints)."""
        return {"budget": self.budget, "rank_pattern": self.rank_pattern, "steps_seen": self.steps_seen,
                "last_step": self.last_step}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restores what :meth:`state_dict` and :meth:`meta_dict` saved."""
        keys = {f"{k[0]}/{'x'.join(map(str, k[1]))}": k for k in self.groups}
        self.reset_ipt()
        for name, t in tensors.items():
            if name.startswith("exp_avg_ipt/"):
                self.exp_avg_ipt[keys[name.split("/", 1)[1]]] = t.clone()
            elif name.startswith("exp_avg_unc/"):
                self.exp_avg_unc[keys[name.split("/", 1)[1]]] = t.clone()
        if "sigma_score" in tensors:
            self.sigma_score = tensors["sigma_score"].clone()
        self.set_masks(tensors["masks"])
        self.budget = meta["budget"]
        self.rank_pattern = meta["rank_pattern"]
        self.steps_seen = meta["steps_seen"]
        self.last_step = meta.get("last_step")

    def masks(self) -> torch.Tensor:
        """Current keep-masks, ``(n_layers, r)``."""
        return torch.stack([layer.rank_mask for layer in self.layers])

    def set_masks(self, masks: torch.Tensor) -> None:
        """Sets every layer's keep-mask from ``(n_layers, r)``."""
        for layer, m in zip(self.layers, masks):
            layer.rank_mask.copy_(m)

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

    # -- importance --------------------------------------------------------------------------
    def _group_values_and_grads(self, kind: str, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source is not None:
            return self.source.values_and_grads(kind, idx)
        params = [self.layers[i].factors[kind] for i in idx]
        values = torch.stack([p.detach() for p in params])
        grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        return values, grads

    def _check_grads(self) -> None:
        if self.source is not None:
            if all(g is None for g in self.source.gradients().values()):
                raise RuntimeError(
                    "after_step() found no gradients of the generated factors: call it after loss.backward() and "
                    "optimizer.step() of a training forward"
                )
            return
        if all(p.grad is None for layer in self.layers for p in layer.factors.values()):
            raise RuntimeError(
                "after_step() found no gradients on the AdaLoRA factors: call it after optimizer.step() and "
                "before optimizer.zero_grad() (the importance scores need this step's gradients)"
            )

    @torch.no_grad()
    def update_ipt(self) -> None:
        """Updates the smoothed sensitivity / uncertainty (``adalora``) or sigma scores."""
        self._check_grads()
        if self.source is not None and self.source.grad_sync is not None:
            self.source.grad_sync()  # data parallel: the same dL/dF on every rank
        c = self.config
        if self.persistent:
            values, grads = self._group_values_and_grads("lam", list(range(len(self.layers))))
            score = (values * grads).abs()  # (n_layers, r)
            self.sigma_score = score if self.sigma_score is None else self.sigma_score + score
            return
        for key, idx in self.groups.items():
            values, grads = self._group_values_and_grads(key[0], idx)
            ipt = (values * grads).abs()
            if key not in self.exp_avg_ipt:
                self.exp_avg_ipt[key] = torch.zeros_like(ipt)
                self.exp_avg_unc[key] = torch.zeros_like(ipt)
            # Same expression order as peft, so scores agree bit for bit.
            self.exp_avg_ipt[key] = c.beta1 * self.exp_avg_ipt[key] + (1 - c.beta1) * ipt
            self.exp_avg_unc[key] = c.beta2 * self.exp_avg_unc[key] + (1 - c.beta2) * (
                ipt - self.exp_avg_ipt[key]).abs()

    def triplet_scores(self) -> torch.Tensor:
        """Importance of each singular value, ``(n_layers, r)``."""
        if self.persistent:
            if self.sigma_score is None:
                return torch.zeros_like(self.masks())
            return self.sigma_score
        n, r = len(self.layers), self.layers[0].r
        ref = next(iter(self.exp_avg_ipt.values()))
        parts = {k: torch.zeros(n, r, dtype=ref.dtype, device=ref.device) for k in ("P", "lam", "Q")}
        for key, idx in self.groups.items():
            if key not in self.exp_avg_ipt:
                continue
            kind = key[0]
            element = self.exp_avg_ipt[key] * self.exp_avg_unc[key]
            if kind == "lam":
                s = element  # (g, r)
            elif kind == "Q":
                s = element.mean(dim=2)  # (g, r, d_in) -> (g, r)
            else:
                s = element.mean(dim=1)  # (g, d_out, r) -> (g, r)
            parts[kind][torch.tensor(idx, device=s.device)] = s
        return parts["lam"] + (parts["Q"] + parts["P"])

    # -- masking -----------------------------------------------------------------------------
    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Keeps the ``budget`` most important singular values (policy permitting)."""
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
            k = self.init_bgt - budget
            if k <= 0:
                keep = torch.ones_like(scores, dtype=torch.bool)
            else:
                threshold = torch.kthvalue(scores.flatten(), k=k)[0].item()
                keep = ~(scores <= threshold)
        self._apply_keep(keep)
        self.rank_pattern = {name: row.tolist() for name, row in zip(self.names, keep.cpu())}
        return self.rank_pattern

    def _apply_keep(self, keep: torch.Tensor) -> None:
        if self.monotone:
            keep = keep & (self.masks() > 0)
        masks = keep.to(self.layers[0].rank_mask.dtype)
        if self.source is None:  # direct factors: zero lam in place, as peft does
            lams = [layer.factors["lam"] for layer in self.layers]
            torch._foreach_mul_([lam.data for lam in lams], list(masks.unbind(0)))
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
        if global_step < final:
            self.update_ipt()
            budget, mask_ind = self.budget_schedule(global_step)
            if mask_ind:
                self.mask_to_budget(budget)
                if self.persistent:
                    self.sigma_score = None
            self.budget = budget
        elif global_step == final:
            self.mask_to_budget(self.target_bgt)
            self.budget = self.target_bgt
            self.reset_ipt()
        elif self.rank_pattern is not None:
            keep = torch.tensor([self.rank_pattern[n] for n in self.names], device=self.layers[0].rank_mask.device)
            self._apply_keep(keep)
        if self.persistent and self.source is None:
            self._apply_keep(self.masks() > 0)  # optimizer momentum must not revive a pruned value
        return self.budget

    def total_rank(self) -> int:
        """Number of live singular values (as of the last allocation)."""
        return int(self.masks().sum().item())
