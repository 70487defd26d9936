"""The fused low-rank linear used by every adapter method.

``y = x W0^T + bias + s * (x_a A^T) B^T`` with a frozen ``W0`` / ``bias``.

Written as one autograd function rather than ``base(x) + B(A(x))`` because the unfused form
pays for an extra activation-sized add in forward and backward per adapted module and for
several autograd nodes per module; here the low-rank term is accumulated into the base
matmul's output buffer (``addmm_``) and the input gradient of both paths is produced by one
``mm`` plus one in-place ``addmm_``. ``W0`` never receives a gradient, so unlike a merged
weight no ``d_out x d_in`` weight gradient is ever formed.

A "folded" variant was also measured (``[y | t] = x [W + sBA ; A]^T`` in one GEMM and
``[gx | u] = g [W + sBA | sB]`` in another, cutting the skinny ``N x r`` products from five to
two). On MiniLM shapes at r = 12 it was 10-20% slower per layer than this version (the
``d + r`` output widths are badly aligned and its strided outputs slow the next ops), and only
on par once r was padded to 16, so it was dropped. Folding ``s B A`` into the weight for the
forward and the input gradient (``x (W + sBA)^T``, ``g (W + sBA)``; the factor gradients
still need four skinny products) measured the same as this version on the whole MiniLM step
(1.17 vs 1.14 x floor for AdaLoRA, 1.20 vs 1.19 for LoRA, one interleaved run) and would round
the update away in bf16, so it was dropped too.
"""

from __future__ import annotations

import torch


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_a, weight, bias, lora_a, lora_b, scale: float, shared_input: bool):
        # x, x_a: (..., d_in); weight: (d_out, d_in); lora_a: (r, d_in); lora_b: (d_out, r)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
        xa2 = x2 if shared_input else x_a.reshape(-1, x_a.shape[-1])
        if bias is not None:
            y = torch.addmm(bias, x2, weight.t())  # (N, d_out)
        else:
            y = x2 @ weight.t()
        t = xa2 @ lora_a.t()  # (N, r)
        y.addmm_(t, lora_b.t(), alpha=scale)
        ctx.save_for_backward(xa2, weight, lora_a, lora_b, t)
        ctx.scale = scale
        ctx.shared_input = shared_input
        ctx.lead = lead
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        xa2, weight, lora_a, lora_b, t = ctx.saved_tensors
        s = ctx.scale
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d_out)
        need_x, need_xa = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_a, need_b = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        u = (g @ lora_b) * s if (need_a or need_x or need_xa) else None  # (N, r)
        grad_b = (g.t() @ t) * s if need_b else None  # (d_out, r)
        grad_a = u.t() @ xa2 if need_a else None  # (r, d_in)
        grad_x = grad_xa = None
        d_in = weight.shape[1]
        if ctx.shared_input:
            if need_x:
                grad_x = g @ weight  # (N, d_in)
                grad_x.addmm_(u, lora_a)
                grad_x = grad_x.reshape(*ctx.lead, d_in)
        else:
            if need_x:
                grad_x = (g @ weight).reshape(*ctx.lead, d_in)
            if need_xa:
                grad_xa = (u @ lora_a).reshape(*ctx.lead, d_in)
        return grad_x, grad_xa, None, None, grad_a, grad_b, None, None


def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    x_adapter: torch.Tensor | None = None,
) -> torch.Tensor:
    """Computes ``x W^T + bias + scale * (x_adapter A^T) B^T`` with frozen ``W`` and ``bias``.

    Args:
        x: Input, shape ``(..., d_in)``.
        weight: Frozen base weight, shape ``(d_out, d_in)`` (may be a transposed view).
        bias: Frozen bias ``(d_out,)`` or ``None``.
        lora_a: Down projection ``(r, d_in)``.
        lora_b: Up projection ``(d_out, r)``.
        scale: Scalar multiplier of the low-rank term.
        x_adapter: Input of the low-rank path when it differs from ``x`` (e.g. after dropout).

    Returns:
        Output of shape ``(..., d_out)``.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Under autocast every operand runs in the autocast dtype, cast once here, and the function
        # runs with autocast off so its in-place accumulation never mixes dtypes (its backward runs
        # outside autocast anyway). Factors stay float32 masters; their gradients come back float32.
        dtype = torch.get_autocast_dtype(device_type)
        x_adapter = None if x_adapter is None or x_adapter is x else x_adapter.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return lowrank_linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                  lora_a, lora_b, scale, x_adapter)
    dtype = x.dtype
    lora_a = lora_a.to(dtype)
    lora_b = lora_b.to(dtype)
    if lora_a.shape[0] == 0:
        return torch.nn.functional.linear(x, weight, bias)
    shared = x_adapter is None or x_adapter is x
    # None rather than x twice: dynamo cannot trace an autograd.Function given one tensor twice.
    return _LowRankLinear.apply(x, None if shared else x_adapter, weight, bias, lora_a, lora_b, float(scale), shared)


def lowrank_add(y: torch.Tensor, x_adapter: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float) -> torch.Tensor:
    """``y + scale * (x_adapter A^T) B^T``: the low-rank term added to a base output computed elsewhere.

    Used over quantised base layers, whose forward (and its input gradient) bitsandbytes computes
    from the packed weight; plain autograd, since no ``W0`` is at hand to fuse with.

    Args:
        y: Base output ``(..., d_out)``.
        x_adapter: Input of the low-rank path ``(..., d_in)``.
        lora_a: Down projection ``(r, d_in)``.
        lora_b: Up projection ``(d_out, r)``.
        scale: Scalar multiplier of the low-rank term.
    """
    if lora_a.shape[0] == 0:
        return y
    dtype = x_adapter.dtype
    t = x_adapter @ lora_a.to(dtype).t()  # (..., r)
    return y + (t @ lora_b.to(dtype).t()).mul_(scale).to(y.dtype)
