"""AdaLoRA's SVD form: ``dW = alpha / (r + 1e-5) * P diag(lam * mask) Q`` (Zhang et al., 2023).

Scaling follows peft exactly (``lora_alpha / (ranknum + 1e-5)`` with ``ranknum = init_r``,
never updated), so factors copied from a peft model give the same outputs.
"""

from __future__ import annotations

import torch

from .base import AdapterMethod


class AdaLoRA(AdapterMethod):
    """SVD-form adapter with ``P`` (d_out x r), ``lam`` (r) and ``Q`` (r x d_in)."""

    name = "adalora"
    factor_kinds = ("P", "lam", "Q")

    def factor_shapes(self, d_out, d_in, r):
        return {"P": (d_out, r), "lam": (r,), "Q": (r, d_in)}

    def init_factors(self, d_out, d_in, r, generator, dtype, device):
        return {
            "P": torch.empty(d_out, r, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator),
            "lam": torch.zeros(r, dtype=dtype, device=device),
            "Q": torch.empty(r, d_in, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator),
        }

    def scaling(self, layer):
        return layer.lora_alpha / (layer.r + 1e-5)

    def effective_factors(self, layer, factors):
        lam = factors["lam"]
        if layer.mask_in_forward:
            lam = lam * layer.rank_mask  # a pruned singular value contributes exactly zero
        return factors["Q"] * lam[:, None], factors["P"], self.scaling(layer)


def orthogonality_penalty(matrices: list[torch.Tensor], transpose_first: bool, squared: bool) -> torch.Tensor:
    """Per-matrix ``||M^T M - I||_F`` (``transpose_first``) or ``||M M^T - I||_F``, batched by shape.

    Args:
        matrices: Same-rank factors; matrices of equal shape are stacked into one ``bmm``.
        transpose_first: ``True`` for P (d_out x r, Gram ``P^T P``), ``False`` for Q (r x d_in).
        squared: Return squared Frobenius norms (paper Eq. 7) instead of norms (peft).

    Returns:
        A 1-D tensor of one penalty per matrix, in input order.
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    out = [None] * len(matrices)
    for idx in by_shape.values():
        stacked = torch.stack([matrices[i] for i in idx])  # (n, rows, cols)
        gram = stacked.transpose(1, 2) @ stacked if transpose_first else stacked @ stacked.transpose(1, 2)  # (n, r, r)
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        diff = gram - eye
        vals = (diff * diff).sum(dim=(1, 2)) if squared else torch.linalg.matrix_norm(diff, ord="fro")
        for j, i in enumerate(idx):
            out[i] = vals[j]
    return torch.stack(out)
