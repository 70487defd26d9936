"""Hypernetwork bodies: sequence-to-sequence maps over the tokens of one factor matrix.

Every body maps ``(n, tokens, h) -> (n, tokens, h)``; ``n`` (the modules of one shape group)
is the batch, so one call serves every module of the group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionLayer(nn.Module):
    """One BERT encoder layer (post-LayerNorm, GELU FFN) using ``scaled_dot_product_attention``.

    Every token attends to every token of the same factor matrix (paper Eq. 8).
    """

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hyper hidden size {hidden} must be divisible by the number of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden)
        self.ffn_in = nn.Linear(hidden, ffn)
        self.ffn_out = nn.Linear(ffn, hidden)
        self.ln2 = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, h = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)  # (n, heads, t, hd)
        a = F.scaled_dot_product_attention(q, k, v)  # (n, heads, t, hd)
        a = a.transpose(1, 2).reshape(n, t, h)
        x = self.ln1(x + self.attn_out(a))
        return self.ln2(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class AttentionBody(nn.Sequential):
    """``layers`` BERT layers; TinyBERT sizes by default (h=312, 12 heads, FFN 1200)."""

    def __init__(self, hidden: int = 312, layers: int = 1, heads: int = 12, ffn: int = 1200) -> None:
        super().__init__(*[AttentionLayer(hidden, heads, ffn) for _ in range(layers)])


class MLPBody(nn.Module):
    """A per-token residual MLP (no mixing across tokens), sized like the attention body."""

    def __init__(self, hidden: int = 312, layers: int = 1, ffn: int = 1200) -> None:
        super().__init__()
        # 2 matrices of h x ffn per layer plus an extra h x (ffn/2) pair ~ attention's 4h^2 + 2 h ffn.
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, ffn + hidden), nn.GELU(), nn.Linear(ffn + hidden, hidden))
            for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, norm in zip(self.blocks, self.norms):
            x = norm(x + block(x))
        return x


class CNNBody(nn.Module):
    """Residual 1-D convolutions over the token sequence (ResNet-style basic blocks)."""

    def __init__(self, hidden: int = 312, layers: int = 1, kernel: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2), nn.GELU(),
                          nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2))
            for _ in range(2 * layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(2 * layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, norm in zip(self.blocks, self.norms):
            x = norm(x + block(x.transpose(1, 2)).transpose(1, 2))  # conv over tokens: (n, h, t)
        return x


def build_body(arch: str, hidden: int, layers: int) -> nn.Module:
    """The body named by ``HyperConfig.arch``."""
    if arch == "attention":
        heads = 12 if hidden % 12 == 0 else max(h for h in (8, 6, 4, 2, 1) if hidden % h == 0)
        return AttentionBody(hidden, layers, heads=heads, ffn=max(4, hidden * 1200 // 312))
    if arch == "mlp":
        return MLPBody(hidden, layers, ffn=max(4, hidden * 1200 // 312))
    if arch == "cnn":
        return CNNBody(hidden, layers)
    raise ValueError(f"unknown hypernetwork body {arch!r}; allowed values: attention, mlp, cnn")
