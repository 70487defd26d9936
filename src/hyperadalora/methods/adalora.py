"""AdaLoRA's SVD form: ``dW = alpha / (r + 1e-5) * P diag(lam * mask) Q`` (Zhang et al., 2023).

Scaling follows peft exactly (``lora_alpha / (ranknum + 1e-5)`` with ``ranknum = init_r``,
never updated), so factors copied from a peft model give the same outputs. The method owns the
keep-mask (``layer.rank_mask``, 1 = kept) that a rank allocator writes, the orthogonality
regulariser and the reduction of a (P column, lam_i, Q row) triplet's scores to one score.
"""

from __future__ import annotations

import torch

from .. import sharding
from .base import AdapterMethod, LoraExport


class AdaLoRA(AdapterMethod):
    """SVD-form adapter with ``P`` (d_out x r), ``lam`` (r) and ``Q`` (r x d_in)."""

    name = "adalora"
    factor_kinds = ("P", "lam", "Q")
    rank_axes = {"P": 1, "lam": 0, "Q": 0}
    zero_init_kinds = ("lam",)
    singular_value_kind = "lam"
    uses_allocator = True
    has_regularizer = True
    varies_rank = True

    def factor_shapes(self, d_out, d_in, r):
        return {"P": (d_out, r), "lam": (r,), "Q": (r, d_in)}

    def init_factors(self, d_out, d_in, r, generator, dtype, device):
        return {
            "P": torch.empty(d_out, r, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator),
            "lam": torch.zeros(r, dtype=dtype, device=device),
            "Q": torch.empty(r, d_in, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator),
        }

    def init_layer(self, layer, w0, generator):
        super().init_layer(layer, w0, generator)
        # 1 = kept, 0 = pruned. Multiplies lam in the forward pass only when layer.mask_in_forward
        # (sigma-grad policy, hyper source); the peft-style policy zeroes lam in place instead.
        layer.register_buffer("rank_mask", torch.ones(layer.r, dtype=w0.dtype, device=w0.device))
        # peft's ranknum: the rank the scale alpha / ranknum is defined at; compaction keeps it.
        layer.ranknum = layer.r

    def state_tensors(self, layer):
        return {"rank_mask": layer.rank_mask}

    def output_mask(self, layer, kind):
        return layer.rank_mask if kind == self.singular_value_kind else None

    def compact_layer(self, layer, keep):
        layer.rank_mask = layer.rank_mask[keep.to(layer.rank_mask.device)]

    def combine_component_scores(self, parts):
        # peft's order: s(lam) + (mean s(Q row) + mean s(P column)), so scores agree bit for bit.
        return parts["lam"] + (parts["Q"] + parts["P"])

    def scaling(self, layer):
        return layer.lora_alpha / (layer.ranknum + 1e-5)

    def effective_factors(self, layer, factors):
        lam = factors["lam"]
        if layer.mask_in_forward:
            lam = lam * layer.rank_mask  # a pruned singular value contributes exactly zero
        return factors["Q"] * lam[:, None], factors["P"], self.scaling(layer)

    def regularizer(self, layers):
        """``sum/mean of ||P^T P - I|| and ||Q Q^T - I||`` over the layers.

        ``orth_reg="peft"`` (default): mean over all 2n factor matrices of the Frobenius norm,
        exactly as peft computes it. ``orth_reg="paper"``: sum over modules of squared norms
        (HyperAdaLoRA Eq. 7).
        """
        squared = self.config.orth_reg == "paper"
        # Outside the layers' forward an FSDP2-sharded P / Q is a DTensor shard: gather it (differentiably).
        factors = [{k: sharding.full(t) for k, t in layer.get_factors().items() if k != "lam"} for layer in layers]
        p_pen = orthogonality_penalty([f["P"] for f in factors], transpose_first=True, squared=squared)
        q_pen = orthogonality_penalty([f["Q"] for f in factors], transpose_first=False, squared=squared)
        if squared:
            return p_pen.sum() + q_pen.sum()
        return (p_pen.sum() + q_pen.sum()) / (2 * len(layers))

    def to_lora(self, layer, factors):
        """Only the kept singular values: ``A = Q[kept]``, ``B = P[:, kept] * lam[kept]``, and
        ``alpha = scale * #kept`` so that peft's ``alpha / r`` equals our ``alpha / (r + 1e-5)``."""
        lam = factors["lam"]
        if layer.mask_in_forward:
            lam = lam * layer.rank_mask
        kept = layer.rank_mask > 0
        a = factors["Q"][kept].detach().clone()
        b = (factors["P"][:, kept] * lam[kept]).detach().clone()
        scale = float(self.scaling(layer))
        dropped = lam[~kept].detach()
        return LoraExport(a, b, scale, scale * int(a.shape[0]), dropped=dropped)


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
