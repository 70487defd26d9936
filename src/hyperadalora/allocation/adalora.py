"""``adalora``: peft's ``RankAllocator``, step for step.

Per element the sensitivity ``|w * dL/dw|`` is smoothed (``beta1``) and its uncertainty tracked
(``beta2``); a triplet (P column, lam_i, Q row) scores the method's combination of the
per-kind means (AdaLoRA: ``s(lam_i) + (mean s(Q_i,:) + mean s(P_:,i))``); at allocation steps
every component whose score is at or below the ``(init_bgt - budget)``-th smallest is zeroed in
place. A zeroed value keeps training and may come back at the next allocation, as in peft.
"""

from __future__ import annotations

import torch

from .base import register_policy
from .masked import MaskedAllocator


def _group_name(key: tuple[str, tuple[int, ...]]) -> str:
    return f"{key[0]}/{'x'.join(map(str, key[1]))}"


@register_policy
class AdaLoRAPolicy(MaskedAllocator):
    """Smoothed sensitivity x uncertainty scores of every factor element (peft / AdaLoRA)."""

    name = "adalora"

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def score_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"exp_avg_ipt/{_group_name(k)}": t.contiguous() for k, t in self.exp_avg_ipt.items()}
        out.update({f"exp_avg_unc/{_group_name(k)}": t.contiguous() for k, t in self.exp_avg_unc.items()})
        return out

    def load_scores(self, tensors: dict[str, torch.Tensor]) -> None:
        keys = {_group_name(k): k for k in self.groups}
        for name, t in tensors.items():
            if name.startswith("exp_avg_ipt/"):
                self.exp_avg_ipt[keys[name.split("/", 1)[1]]] = t.clone()
            elif name.startswith("exp_avg_unc/"):
                self.exp_avg_unc[keys[name.split("/", 1)[1]]] = t.clone()

    @torch.no_grad()
    def update_ipt(self) -> None:
        self._prepare_grads()
        c = self.config
        for key, idx in self.groups.items():
            values, grads = self._values_and_grads(key[0], idx)
            ipt = (values * grads).abs()
            if key not in self.exp_avg_ipt:
                self.exp_avg_ipt[key] = torch.zeros_like(ipt)
                self.exp_avg_unc[key] = torch.zeros_like(ipt)
            # Same expression order as peft, so scores agree bit for bit.
            self.exp_avg_ipt[key] = c.beta1 * self.exp_avg_ipt[key] + (1 - c.beta1) * ipt
            self.exp_avg_unc[key] = c.beta2 * self.exp_avg_unc[key] + (1 - c.beta2) * (
                ipt - self.exp_avg_ipt[key]).abs()

    def triplet_scores(self) -> torch.Tensor:
        if not self.exp_avg_ipt:
            raise RuntimeError(
                f"no importance score exists yet (last after_step at step {self.last_step}): the budget phase ends at "
                f"step {self.config.total_step - self.config.tfinal} (total_step - tfinal), and after_step() must run "
                "at earlier steps, after a training backward, before the final budget can be chosen")
        by_kind: dict[str, dict] = {kind: {} for kind in self.method.factor_kinds}
        for key in self.groups:
            if key in self.exp_avg_ipt:
                by_kind[key[0]][key] = self.method.component_scores(
                    key[0], self.exp_avg_ipt[key] * self.exp_avg_unc[key])  # (g, r_g)
        parts = {kind: self.padded_rows(rows) for kind, rows in by_kind.items()}  # (n, r_max) each
        return self.method.combine_component_scores(parts)
