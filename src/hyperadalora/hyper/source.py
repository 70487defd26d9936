"""The ``hyper`` factor source: one hypernetwork per factor kind generates every module's factor.

Each factor has a *state* ``S`` (a buffer, initialised exactly as the direct factor would be).
Per training forward (or per optimizer step, ``HyperConfig.generate``), for each (kind, shape)
group of modules, one call ``F = S + scale * H_kind(S)`` generates the factors of every module
in the group at once; the adapted layers read their slice of ``F``. Gradients reach only the
hypernetwork parameters. After the optimizer step, recurrent mode sets ``S <- F.detach()``
(paper Eqs. 4-6); reparam mode keeps ``S``; anchored mode generates ``F = S0 + scale * H(S)``
and sets ``S <- F`` (the state tracks the generated factor instead of integrating it).
AdaLoRA's keep-mask multiplies the generated ``lam`` (and the next state).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import HyperConfig
from ..layers import AdaptedLinear
from .bodies import build_body
from .tokens import TokenLayout, from_rank_width, to_rank_width

GroupKey = tuple[str, tuple[int, ...]]


def _rank_width_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, int]:
    if kind == "lam":
        return shape[0], 1
    if kind in ("P", "B"):
        return shape[1], shape[0]
    return shape[0], shape[1]


class KindHypernetwork(nn.Module):
    """``H_kind``: tokens of a factor -> a residual of the same shape, for every module of a kind.

    Per token: an input projection (one per token width), optional context embeddings (module,
    rank-block and width-block position), the body, and a zero-initialised output projection,
    so that the generated factor equals the state at step 0.
    """

    def __init__(self, kind: str, config: HyperConfig, layout: TokenLayout, token_dims: set[int],
                 n_modules: int, max_rank_blocks: int, max_width_blocks: int) -> None:
        super().__init__()
        h = config.hidden_for(kind)
        self.kind = kind
        self.scale = config.scale_for(kind)
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
        return self.out_proj[str(d)](self._body(x)) * self.scale  # (n, T, D)


class GeneratedFactors:
    """A layer's factor provider: its slice of the source's generated factors.

    A plain object rather than a closure, so that ``copy.deepcopy`` of a wrapped model points
    the copied layers at the copied source (a lambda would keep reading the original).
    """

    def __init__(self, source: HyperFactorSource, index: int) -> None:
        self.source, self.index = source, index

    def __call__(self) -> dict[str, torch.Tensor]:
        return self.source.factors_for(self.index)


class HyperFactorSource(nn.Module):
    """Generates the factors of every adapted layer with one hypernetwork per factor kind.

    Args:
        layers: Adapted layers by name (their direct factors are taken over as initial states).
        factor_kinds: The method's generated factor kinds (``P, lam, Q`` or ``A, B``).
        config: Hypernetwork settings.
    """

    def __init__(self, layers: dict[str, AdaptedLinear], factor_kinds: tuple[str, ...], config: HyperConfig) -> None:
        super().__init__()
        self.config = config
        self.layout = TokenLayout.from_config(config)
        self.layer_list = list(layers.values())
        self.kinds = factor_kinds
        self.groups: dict[GroupKey, list[int]] = {}
        for i, layer in enumerate(self.layer_list):
            for kind in factor_kinds:
                self.groups.setdefault((kind, tuple(layer.factors[kind].shape)), []).append(i)
        self.group_names = {key: f"{key[0]}_{'x'.join(map(str, key[1]))}" for key in self.groups}
        # States: the direct factors, stacked per group; the layers stop owning parameters.
        for key, idx in self.groups.items():
            state = torch.stack([self.layer_list[i].factors[key[0]].detach() for i in idx])
            self.register_buffer(f"state_{self.group_names[key]}", state.clone())
            if config.mode == "anchored":
                self.register_buffer(f"anchor_{self.group_names[key]}", state.clone())
            self.register_buffer(f"ids_{self.group_names[key]}", torch.tensor(idx), persistent=False)
        for layer in self.layer_list:
            for kind in factor_kinds:
                del layer.factors[kind]
        nets = {}
        for kind in factor_kinds:
            dims, max_gr, max_gw = set(), 1, 1
            for (k, shape) in self.groups:
                if k != kind:
                    continue
                rank, width = _rank_width_shape(k, shape)
                dims.add(self.layout.token_dim(rank, width))
                gr, gw = self.layout.grid(rank, width)
                max_gr, max_gw = max(max_gr, gr), max(max_gw, gw)
            nets[kind] = KindHypernetwork(kind, config, self.layout, dims, len(self.layer_list), max_gr, max_gw)
        self.nets = nn.ModuleDict(nets)
        self.generated: dict[GroupKey, torch.Tensor] | None = None
        # generate="per_step": the detached leaves the model reads (their .grad accumulates over micro-batches).
        self.leaves: dict[GroupKey, torch.Tensor] | None = None
        self._flushed = False
        self._per_layer: list[dict[str, torch.Tensor]] | None = None
        self._cache_grad_mode: bool | None = None
        # Set by integrations.distributed.prepare_ddp: averages dL/dF across data-parallel ranks
        # before it is used (backward_hypernetworks, allocator scores). None: single process.
        self.grad_sync = None
        for i, layer in enumerate(self.layer_list):
            layer.set_factor_provider(GeneratedFactors(self, i))
            layer.mask_in_forward = True  # a pruned singular value is zero in every forward pass

    # -- states ------------------------------------------------------------------------------
    def state(self, key: GroupKey) -> torch.Tensor:
        """The stacked state of a group, ``(n, *shape)``."""
        return getattr(self, f"state_{self.group_names[key]}")

    def module_ids(self, key: GroupKey) -> torch.Tensor:
        return getattr(self, f"ids_{self.group_names[key]}")

    @torch.no_grad()
    def reset_state(self, key: GroupKey, value: torch.Tensor) -> None:
        """Sets a group's state (and, in anchored mode, its anchor) as if it were the initial one."""
        self.state(key).copy_(value)
        self.anchor(key).copy_(value)
        self.invalidate()

    def anchor(self, key: GroupKey) -> torch.Tensor:
        """What the generated residual is added to: the initial state (anchored mode) or the state."""
        name = f"anchor_{self.group_names[key]}"
        return getattr(self, name) if hasattr(self, name) else self.state(key)

    # -- generation ----------------------------------------------------------------------------
    def generate_group(self, key: GroupKey) -> torch.Tensor:
        """``F = A + scale * H_kind(S)`` for every module of one group, ``(n, *shape)``.

        ``A`` is the anchor: the state ``S`` itself (recurrent, reparam) or the initial state
        (anchored mode).
        """
        kind, shape = key
        s = self.state(key)
        view = to_rank_width(kind, s)  # (n, rank, width)
        rank, width = view.shape[1:]
        tokens = self.layout.cut(view)  # (n, T, D)
        delta = self.nets[kind](tokens, self.module_ids(key), self.layout.grid(rank, width))
        f = self.anchor(key) + from_rank_width(kind, self.layout.uncut(delta, rank, width))
        return f  # AdaLoRA's keep-mask multiplies the generated lam in the layer (mask_in_forward)

    @property
    def per_step(self) -> bool:
        return self.config.generate == "per_step"

    def regenerate(self) -> None:
        """Generates every group now (one hypernetwork call per (kind, shape) group)."""
        if self.config.checkpointing and torch.is_grad_enabled():
            # Keeps only the states and anchors; the backward recomputes the hypernetwork's activations.
            generated = {key: checkpoint(self.generate_group, key, use_reentrant=False) for key in self.groups}
        else:
            generated = {key: self.generate_group(key) for key in self.groups}
        used, self.leaves = generated, None
        if torch.is_grad_enabled():
            if self.per_step:
                # The model reads leaves; backward_hypernetworks() sends their summed grads through H once.
                self.leaves = {key: t.detach().requires_grad_(True) for key, t in generated.items()}
                used = self.leaves
            else:
                for t in generated.values():
                    if t.requires_grad:
                        t.retain_grad()  # the allocator's importance scores read dL/dF
        per_layer: list[dict[str, torch.Tensor]] = [{} for _ in self.layer_list]
        for key, t in used.items():
            for pos, i in enumerate(self.groups[key]):
                per_layer[i][key[0]] = t[pos]
        self.generated, self._per_layer = generated, per_layer
        self._cache_grad_mode = torch.is_grad_enabled()
        self._flushed = False

    def has_generated(self) -> bool:
        """Whether factors for the current optimizer step exist (with a graph in training)."""
        return self._per_layer is not None and self._cache_grad_mode is True

    def backward_hypernetworks(self) -> bool:
        """``per_step``: backpropagates the gradients accumulated on the generated factors into the
        hypernetworks (one backward per step, whatever the number of micro-batches).

        Returns:
            Whether anything was backpropagated (``False`` for ``per_forward`` or when already done).
        """
        if not self.per_step or self.leaves is None or self._flushed:
            return False
        if self.grad_sync is not None:
            self.grad_sync()
        pairs = [(self.generated[k], leaf.grad) for k, leaf in self.leaves.items()
                 if leaf.grad is not None and self.generated[k].requires_grad]
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        self._flushed = True
        return bool(pairs)

    def gradients(self) -> dict[GroupKey, torch.Tensor | None]:
        """``dL/dF`` of every group (accumulated over the step's micro-batches for ``per_step``)."""
        if self.generated is None:
            return {}
        source = self.leaves if self.leaves is not None else self.generated
        return {key: t.grad for key, t in source.items()}

    def invalidate(self) -> None:
        """Drops the generated factors (after a step or a mode change)."""
        self.generated = self._per_layer = self.leaves = None
        self._cache_grad_mode = None

    def factors_for(self, index: int) -> dict[str, torch.Tensor]:
        """The generated factors of layer ``index`` (generating them if needed)."""
        if self._per_layer is None or self._cache_grad_mode != torch.is_grad_enabled():
            self.regenerate()
        return self._per_layer[index]

    def values_and_grads(self, kind: str, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Generated values and their gradients for the allocator, stacked in ``idx`` order."""
        if self.generated is None:
            raise RuntimeError("after_step() found no generated factors: run a training forward and backward first")
        vals, grads = [], []
        all_grads = self.gradients()
        for key, members in self.groups.items():
            if key[0] != kind:
                continue
            t = self.generated[key]
            g = all_grads[key] if all_grads[key] is not None else torch.zeros_like(t)
            for pos, i in enumerate(members):
                if i in idx:
                    vals.append((idx.index(i), t[pos].detach(), g[pos]))
        vals.sort(key=lambda v: v[0])
        return torch.stack([v[1] for v in vals]), torch.stack([v[2] for v in vals])

    def _lam_masks(self, key: GroupKey) -> torch.Tensor | None:
        if key[0] != "lam" or not hasattr(self.layer_list[0], "rank_mask"):
            return None
        return torch.stack([self.layer_list[i].rank_mask for i in self.groups[key]])  # (n, r)

    @torch.no_grad()
    def after_step(self) -> None:
        """Recurrent and anchored modes: ``S <- F`` (lam masked); then forget the generated factors."""
        if self.per_step and self.leaves is not None and not self._flushed and any(
                t.grad is not None for t in self.leaves.values()):
            raise RuntimeError(
                "HyperConfig.generate='per_step': the gradients of the generated factors never reached the "
                "hypernetworks, so the optimizer step changed nothing. Call model.backward_hypernetworks() after "
                "the last micro-batch's backward (before gradient clipping), or model.attach_optimizer(optimizer) "
                "once, or use generate='per_forward'.")
        for key in self.groups:
            state = self.state(key)
            if self.config.mode != "reparam" and self.generated is not None:
                state.copy_(self.generated[key].detach())
            mask = self._lam_masks(key)
            if mask is not None:
                state.mul_(mask)  # a pruned singular value stays zero in the next state too
        self.invalidate()

    def calls_per_kind(self) -> dict[str, int]:
        """How many times each kind's hypernetwork has run (for tests and benchmarks)."""
        return {k: net.calls for k, net in self.nets.items()}

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of each kind's hypernetwork (and of its body alone)."""
        out = {}
        for kind, net in self.nets.items():
            out[kind] = sum(p.numel() for p in net.parameters())
            out[f"{kind}.body"] = sum(p.numel() for p in net.body.parameters())
        return out
