"""FLOPs and activation memory of one hypernetwork generation (every factor group, once).

Per group of ``n`` modules with ``T`` tokens of ``D`` features and a body of width ``h``
(``sources.HyperSource.generate_group``), in multiply-adds x 2:

* forward: input projection ``2 n T D h``, body ``2 n T W`` (``W`` = the body's weights; a
  weight is used once per token) plus, for the attention body, ``4 n T^2 h`` per layer
  (``Q K^T`` and ``A V``), output projection ``2 n T h D``;
* backward: twice the forward for the body and the output projection (input and weight
  gradients), once for the input projection (its input is a state buffer, so only the weight
  gradient); an attention map's backward is twice its forward;
* activation checkpointing (``HyperConfig.checkpointing``, or a group larger than
  ``max_tokens_per_call``, whose chunks are checkpointed) runs the body's forward again.

Saved activations per token: the tokens (``D``), the body's linears' inputs and outputs
(each linear's input and output widths summed: that counts q, k, v, attention output, norms
and the MLP of an attention layer exactly as the model blocks are counted) and the generated
residual (``D``); fp32, as hypernetworks train in fp32.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..config import HyperConfig
from ..hyper import build_body
from .adapters import AdapterCounts, FactorGroup, body_params

FP32 = 4


@functools.lru_cache(maxsize=64)
def body_widths(arch: str, hidden: int, layers: int) -> int:
    """Summed input + output widths of the body's linears / convolutions (saved features per token)."""
    with torch.device("meta"):
        body = build_body(arch, hidden, layers)
    total = 0
    for m in body.modules():
        if isinstance(m, nn.Linear):
            total += m.in_features + m.out_features
        elif isinstance(m, nn.Conv1d):
            total += m.in_channels + m.out_channels
    return total


def _attention_maps(arch: str) -> int:
    """``T^2 h`` multiply-add pairs per layer: 2 for an attention body (scores and mixing)."""
    return 2 if arch == "attention" else 0


def group_flops(g: FactorGroup, hyper: HyperConfig) -> dict[str, float]:
    """Forward, backward and recompute FLOPs of one group's generation."""
    h = hyper.hidden_for(g.kind)
    nt = g.modules * g.tokens
    body = 2 * nt * body_params(hyper.arch, h, hyper.layers)
    body += 2 * _attention_maps(hyper.arch) * hyper.layers * nt * g.tokens * h
    proj_in = proj_out = 2 * nt * g.token_dim * h
    chunked = hyper.max_tokens_per_call is not None and nt > hyper.max_tokens_per_call
    return {"forward": proj_in + body + proj_out, "backward": proj_in + 2 * (body + proj_out),
            "recompute": body if (hyper.checkpointing or chunked) else 0.0}


def generation_flops(counts: AdapterCounts, hyper: HyperConfig) -> float:
    """FLOPs of one generation of every group, forward + backward (+ recompute)."""
    return sum(sum(group_flops(g, hyper).values()) for g in counts.groups)


def group_activation_bytes(g: FactorGroup, hyper: HyperConfig) -> tuple[float, float]:
    """(bytes kept until the backward, bytes alive only while one chunk is recomputed)."""
    h = hyper.hidden_for(g.kind)
    nt = g.modules * g.tokens
    full = FP32 * (2 * g.token_dim + body_widths(hyper.arch, h, hyper.layers))
    if hyper.checkpointing:
        return 0.0, nt * full  # only the states stay; the whole group is recomputed at once
    if hyper.max_tokens_per_call is not None and nt > hyper.max_tokens_per_call:
        # Chunks of whole modules run checkpointed: their inputs stay, one chunk is recomputed.
        chunk = max(1, hyper.max_tokens_per_call // g.tokens) * g.tokens
        return nt * FP32 * (2 * g.token_dim + h), chunk * full
    return nt * full, 0.0


def generation_activation_bytes(counts: AdapterCounts, hyper: HyperConfig) -> float:
    """Peak hypernetwork activation bytes of one generation (all groups kept, one recomputed)."""
    kept = recompute = 0.0
    for g in counts.groups:
        k, r = group_activation_bytes(g, hyper)
        kept, recompute = kept + k, max(recompute, r)
    return kept + recompute
