"""``H_kind``: the hypernetwork of one factor kind, shared by every module (DESIGN.md section 2)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import HyperConfig
from .bodies import build_body
from .tokens import TokenLayout


class KindHypernetwork(nn.Module):
    """``H_kind``: tokens of a factor -> a residual of the same shape, for every module of a kind.

    Per token: an input projection (one per token width), optional context embeddings (module,
    rank-block and width-block position, and the current task's when ``task_embeddings > 0``), the body, and a zero-initialised output projection,
    so that the generated factor equals the state at step 0.

    Args:
        kind: The factor kind it generates.
        config: Hypernetwork settings.
        layout: The token layout.
        token_dims: Features per token of every shape it serves (one projection each).
        n_modules: Number of adapted modules (context embeddings).
        max_rank_blocks: Largest number of token blocks along the rank axis.
        max_width_blocks: Largest number of token blocks along the width axis.
        singular_values: Whether the kind holds the singular values (``HyperConfig.lam_hidden`` applies).
    """

    def __init__(self, kind: str, config: HyperConfig, layout: TokenLayout, token_dims: set[int],
                 n_modules: int, max_rank_blocks: int, max_width_blocks: int, singular_values: bool = False) -> None:
        super().__init__()
        h = config.hidden_for(singular_values)
        self.kind = kind
        self.scale = config.scale_for(singular_values)
        self.in_proj = nn.ModuleDict({str(d): nn.Linear(d, h) for d in sorted(token_dims)})
        self.out_proj = nn.ModuleDict({str(d): nn.Linear(h, d) for d in sorted(token_dims)})
        for proj in self.out_proj.values():
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
        self.body = build_body(config.arch, h, config.layers)
        self.context = config.context
        if config.context:
            self.module_emb = nn.Parameter(0.02 * torch.randn(n_modules, h))
            self.rank_emb = nn.Parameter(0.02 * torch.randn(max_rank_blocks, h))
        # Blocks along the width are ordered (a patch of a column vector is not exchangeable).
        self.width_emb = nn.Parameter(0.02 * torch.randn(max_width_blocks, h)) if max_width_blocks > 1 else None
        self.max_tokens = config.max_tokens_per_call
        self.calls = 0
        self.task_emb: nn.Parameter | None = None  # add_task_embeddings
        self.task = 0  # the row of task_emb in use (HyperSource.set_task)

    def add_task_embeddings(self, count: int) -> None:
        """``count`` learned task embeddings (``HyperConfig.task_embeddings``). The source draws them
        after every hypernetwork is built, so that the rest is initialised as without them."""
        h = self.in_proj[next(iter(self.in_proj))].out_features
        self.task_emb = nn.Parameter(0.02 * torch.randn(count, h))

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        """The body over ``(n, T, h)``, in module chunks of at most ``max_tokens`` tokens."""
        n, t, _ = x.shape
        if self.max_tokens is None or n * t <= self.max_tokens:
            return self.body(x)
        per_chunk = max(1, self.max_tokens // t)
        # Checkpointing keeps only each chunk's input alive for backward: memory O(chunk), not O(n).
        return torch.cat([checkpoint(self.body, c, use_reentrant=False) if torch.is_grad_enabled() else self.body(c)
                          for c in x.split(per_chunk)])

    def forward(self, tokens: torch.Tensor, module_ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Maps ``(n, T, D)`` tokens of ``n`` modules to a ``(n, T, D)`` residual."""
        self.calls += 1
        d = tokens.shape[-1]
        x = self.in_proj[str(d)](tokens)  # (n, T, h)
        gr, gw = grid
        if self.context:
            rank_pos = self.rank_emb[:gr].repeat_interleave(gw, dim=0)  # (T, h), row-major blocks
            x = x + self.module_emb[module_ids][:, None, :] + rank_pos[None]
        if self.width_emb is not None and gw > 1:
            x = x + self.width_emb[:gw].repeat(gr, 1)[None]
        if self.task_emb is not None:
            x = x + self.task_emb[self.task]  # (h,): the same task for every token of the call
        return self.out_proj[str(d)](self._body(x)) * self.scale  # (n, T, D)
