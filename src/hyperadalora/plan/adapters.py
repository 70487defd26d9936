"""Adapter and hypernetwork sizes for a model shape: which linears, factor shapes, token groups.

Factor shapes come from the method (``method_class(name)().factor_shapes``); parameters a method
keeps outside its factors (DoRA's magnitude) are read off one :class:`~hyperadalora.AdaptedLinear`
built on the meta device, so the planner follows the methods without naming them. Hypernetwork
sizes follow :class:`~hyperadalora.sources.HyperSource`: one hypernetwork per factor kind
with an input and an output projection per distinct token width, the body, and the context
embeddings; every (kind, factor shape) group of modules is one batched call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..config import AdapterConfig, HyperConfig
from ..hyper import TokenLayout, build_body
from ..hyper.tokens import rank_width_shape
from ..layers import AdaptedLinear
from ..methods import method_class
from .shapes import Linear, ModelShape, PlanInputError


@dataclass(frozen=True)
class FactorGroup:
    """The modules whose factor of one kind has one shape: one hypernetwork call.

    Attributes:
        kind: Factor kind (``A``, ``B``, ``P``, ``lam``, ``Q``).
        shape: The factor's shape.
        modules: Modules in the group.
        tokens: Tokens per module under the layout.
        token_dim: Features per token.
        grid: Token blocks along the rank and the width axis.
    """

    kind: str
    shape: tuple[int, ...]
    modules: int
    tokens: int
    token_dim: int
    grid: tuple[int, int]

    @property
    def numel(self) -> int:
        """Factor elements of the whole group."""
        n = self.modules
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class AdapterCounts:
    """Adapted linears and their parameters.

    Attributes:
        linears: The adapted linears of the whole model (one entry per module).
        factor_params: Factor elements (trained parameters for ``direct``; states for ``hyper``).
        extra_params: Parameters a method trains directly besides its factors (DoRA's magnitude).
        head_params: Parameters of a trained task head (``modules_to_save``: a classifier).
        groups: The (kind, shape) groups a hypernetwork source generates.
        r: The adapters' rank.
    """

    linears: tuple[Linear, ...]
    factor_params: int
    extra_params: int
    head_params: int
    groups: tuple[FactorGroup, ...]
    r: int

    @property
    def modules(self) -> int:
        return len(self.linears)

    @property
    def rank_sum(self) -> int:
        """Summed ranks of all adapted linears (each saves an ``N x r`` down-projection)."""
        return self.r * self.modules


def _matches(lin: Linear, targets: tuple[str, ...]) -> bool:
    full = "model." + lin.name  # the module's full name ends with its suffix
    return any(full.endswith("." + t) for t in targets)


def adapted_linears(shape: ModelShape, config: AdapterConfig) -> list[Linear]:
    """The linears ``config.target_modules`` selects (``all-linear`` or module-name suffixes).

    Raises:
        PlanInputError: A regular expression target (not modelled), or nothing matched.
    """
    tm = config.target_modules
    per_block, heads = shape.block_linears(), shape.adaptable_head_linears()
    if tm == "all-linear":
        chosen_block, chosen_head = per_block, heads
    elif isinstance(tm, tuple):
        chosen_block = [lin for lin in per_block if _matches(lin, tm)]
        chosen_head = [lin for lin in heads if _matches(lin, tm)]
    else:
        raise PlanInputError(f"target_modules={tm!r}: the planner takes 'all-linear' or module names, not a regex")
    if not chosen_block and not chosen_head:
        names = [lin.name for lin in per_block + heads]
        raise PlanInputError(f"target_modules={tm!r} matched no linear of {shape.name}; its linears: {names}")
    return chosen_block * shape.layers + chosen_head


@functools.lru_cache(maxsize=256)
def extra_direct_params(method: str, d_out: int, d_in: int, r: int) -> int:
    """Trainable parameters of one adapted ``d_out x d_in`` linear besides its factors."""
    layer = AdaptedLinear(nn.Linear(d_in, d_out, bias=False, device="meta"), method_class(method)(), r, 1.0)
    factor_ids = {id(p) for p in layer.factors.parameters()}
    return sum(p.numel() for p in layer.parameters() if p.requires_grad and id(p) not in factor_ids)


def count_adapters(shape: ModelShape, config: AdapterConfig) -> AdapterCounts:
    """Adapter parameters and hypernetwork groups of ``shape`` adapted as ``config`` says."""
    method = method_class(config.method)()
    linears = adapted_linears(shape, config)
    layout = TokenLayout.from_config(config.hyper)
    factor_params = extra = 0
    groups: dict[tuple[str, tuple[int, ...]], int] = {}
    for lin in linears:
        for kind, fshape in method.factor_shapes(lin.d_out, lin.d_in, config.r).items():
            n = 1
            for d in fshape:
                n *= d
            factor_params += n
            groups[(kind, tuple(fshape))] = groups.get((kind, tuple(fshape)), 0) + 1
        extra += extra_direct_params(config.method, lin.d_out, lin.d_in, config.r)
    out = []
    for (kind, fshape), n in groups.items():
        rank, width = rank_width_shape(fshape, method.rank_axes[kind])
        out.append(FactorGroup(kind, fshape, n, layout.num_tokens(rank, width), layout.token_dim(rank, width),
                               layout.grid(rank, width)))
    adapted = {lin.name for lin in linears}
    head = sum(lin.params for lin in shape.head_linears() if lin.name not in adapted) \
        if shape.task == "sequence-classification" else 0
    return AdapterCounts(tuple(linears), factor_params, extra, head, tuple(out), config.r)


@functools.lru_cache(maxsize=64)
def body_params(arch: str, hidden: int, layers: int) -> int:
    """Parameters of one hypernetwork body (built on the meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_body(arch, hidden, layers).parameters())


def hypernetwork_params(counts: AdapterCounts, hyper: HyperConfig) -> dict[str, int]:
    """Parameters of each kind's hypernetwork: projections per token width, body, embeddings."""
    out = {}
    for kind in dict.fromkeys(g.kind for g in counts.groups):
        h = hyper.hidden_for(kind)
        groups = [g for g in counts.groups if g.kind == kind]
        dims = {g.token_dim for g in groups}
        grids = [g.grid for g in groups]
        max_gr, max_gw = max(1, *(gr for gr, _ in grids)), max(1, *(gw for _, gw in grids))
        proj = sum(2 * d * h + h + d for d in dims)  # in (d -> h) and out (h -> d) projections, with biases
        context = (counts.modules + max_gr) * h if hyper.context else 0
        width = max_gw * h if max_gw > 1 else 0
        out[kind] = proj + body_params(hyper.arch, h, hyper.layers) + context + width
    return out
