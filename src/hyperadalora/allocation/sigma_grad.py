"""``sigma-grad`` (HyperAdaLoRA, Appendix D): ``|sigma * dL/dsigma|`` since the last allocation.

At each allocation step the lowest-scoring live singular values are pruned until the scheduled
budget is met, and a pruned value stays exactly zero for the rest of training.
"""

from __future__ import annotations

import torch

from .base import register_policy
from .masked import MaskedAllocator


@register_policy
class SigmaGradPolicy(MaskedAllocator):
    """Scores each singular value by ``|sigma * dL/dsigma|`` accumulated between allocations."""

    name = "sigma-grad"
    persistent = True

    def reset_ipt(self) -> None:
        self.sigma_score: torch.Tensor | None = None

    def score_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.sigma_score is None else {"sigma_score": self.sigma_score.contiguous()}

    def load_scores(self, tensors: dict[str, torch.Tensor]) -> None:
        if "sigma_score" in tensors:
            self.sigma_score = tensors["sigma_score"].clone()

    @torch.no_grad()
    def update_ipt(self) -> None:
        self._prepare_grads()
        rows = {}
        for key, idx in self.groups.items():
            if key[0] == self.kind:
                values, grads = self._values_and_grads(self.kind, idx)
                rows[key] = (values * grads).abs()  # (g, r_g)
        score = self.padded_rows(rows)  # (n_layers, r_max)
        self.sigma_score = score if self.sigma_score is None else self.sigma_score + score

    def triplet_scores(self) -> torch.Tensor:
        if self.sigma_score is None:
            return torch.zeros_like(self.masks())
        return self.sigma_score

    def after_allocation(self) -> None:
        self.sigma_score = None
