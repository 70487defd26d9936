"""Finding target modules and swapping adapter layers in and out."""

from __future__ import annotations

import re

import torch
from torch import nn

from .config import AdapterConfig
from .layers import AdaptedLinear
from .methods import AdapterMethod

# Names of output / task heads that "all-linear" never adapts (transformers' conventions).
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "embed_out", "output_projection")


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a layer the adapters support (``nn.Linear`` or GPT-2 ``Conv1D``)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _head_module_ids(model: nn.Module) -> set[int]:
    ids = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module):
            ids.add(id(out))
    return ids


def _is_head_name(name: str) -> bool:
    return any(part in HEAD_NAMES for part in name.split("."))


def find_target_modules(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules ``config.target_modules`` selects, in model order.

    Raises:
        ValueError: If nothing matches (the message lists the available linear layer names), or
            a selected module is not a supported linear layer.
    """
    linear_names = [n for n, m in model.named_modules() if is_linear(m) and n]
    head_ids = _head_module_ids(model)
    saved = set(config.modules_to_save)

    def in_saved(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") or name.endswith("." + s) or f".{s}." in name for s in saved)

    tm = config.target_modules
    modules = dict(model.named_modules())
    if tm == "all-linear":
        selected = [n for n in linear_names
                    if id(modules[n]) not in head_ids and not _is_head_name(n) and not in_saved(n)]
    elif isinstance(tm, str):
        try:
            pattern = re.compile(tm)
        except re.error as exc:
            raise ValueError(f"AdapterConfig.target_modules={tm!r} is not a valid regular expression: {exc}") from None
        selected = [n for n, m in model.named_modules() if n and pattern.fullmatch(n)]
    else:
        selected = [n for n, m in model.named_modules() if n and any(n == t or n.endswith("." + t) for t in tm)]
    if not selected:
        suffixes = sorted({n.split(".")[-1] for n in linear_names})
        raise ValueError(
            f"AdapterConfig.target_modules={tm!r} matched no module of {type(model).__name__}. "
            f"Available linear module names: {', '.join(suffixes)} ({len(linear_names)} linear layers, e.g. "
            f"{linear_names[0] if linear_names else 'none'}); pass names from this list, a regex, or 'all-linear'."
        )
    bad = [n for n in selected if not is_linear(modules[n])]
    if bad:
        raise ValueError(
            f"AdapterConfig.target_modules selected {bad[0]!r} of type {type(modules[bad[0]]).__name__}; only "
            "nn.Linear and Conv1D layers can be adapted. Narrow target_modules (e.g. to names of linear layers)."
        )
    return selected


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def module_ranks(names: list[str], config: AdapterConfig) -> dict[str, int]:
    """The rank of every target module (``config.rank_pattern`` or ``r``); 0 means left unadapted.

    Raises:
        ValueError: If a ``rank_pattern`` key matches no target module (a typo would silently
            leave the default rank), or every module has rank 0.
    """
    ranks = {name: config.rank_for(name) for name in names}
    unmatched = [k for k in (config.rank_pattern or {}) if not any(n == k or n.endswith("." + k) for n in names)]
    if unmatched:
        raise ValueError(f"AdapterConfig.rank_pattern key {unmatched[0]!r} matches none of the {len(names)} target "
                         f"modules (e.g. {names[0]!r}); use their names as find_target_modules gives them")
    if not any(ranks.values()):
        raise ValueError("AdapterConfig.rank_pattern gives every target module rank 0: nothing would be adapted")
    return ranks


def inject_adapters(model: nn.Module, config: AdapterConfig, method: AdapterMethod) -> dict[str, AdaptedLinear]:
    """Freezes ``model`` and replaces each target module with an :class:`AdaptedLinear`.

    Each module gets its own rank (:func:`module_ranks`); a module of rank 0 is left as it is.

    Args:
        model: The model to adapt (modified in place).
        config: What to adapt.
        method: The method object every adapted layer shares.

    Returns:
        The adapted layers by module name, in model order.
    """
    ranks = module_ranks(find_target_modules(model, config), config)
    for p in model.parameters():
        p.requires_grad_(False)
    generator = None
    if config.seed is not None:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(config.seed)
    layers: dict[str, AdaptedLinear] = {}
    for name, rank in ranks.items():
        if rank == 0:
            continue  # dropped out by the rank allocation: the frozen layer stays as it is
        base = model.get_submodule(name)
        layer = AdaptedLinear(base, method, rank, config.lora_alpha, config.lora_dropout, generator)
        _set_submodule(model, name, layer)
        layers[name] = layer
    for name in config.modules_to_save:
        mods = [n for n, _ in model.named_modules() if n == name or n.endswith("." + name)]
        if not mods:
            raise ValueError(f"AdapterConfig.modules_to_save entry {name!r} matches no module of "
                             f"{type(model).__name__}; top-level children: {[n for n, _ in model.named_children()]}")
        for n in mods:
            for p in model.get_submodule(n).parameters():
                p.requires_grad_(True)
    return layers


def remove_adapters(model: nn.Module, layers: dict[str, AdaptedLinear], merge: bool) -> nn.Module:
    """Puts the original layers back (merging each adapter into its weight first if ``merge``)."""
    for name, layer in layers.items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    return model
