"""Export any trained hyperadalora model as a plain peft LoRA adapter.

The exported directory is what ``peft.PeftModel.from_pretrained(base_model, directory)`` reads
(``adapter_config.json`` + ``adapter_model.safetensors``, peft's key names), so the
hypernetwork and the allocator are a training-time cost only: the served adapter is LoRA.

Conversion, always with evaluation semantics (dropout off, DyLoRA at full rank, generated
factors as the evaluation forward uses them):

* LoRA: ``A``, ``B`` as they are, ``lora_alpha`` and ``r`` from the config.
* DyLoRA: LoRA with the full rank ``r`` and scale ``alpha / r`` (what evaluation uses).
* DoRA: LoRA factors plus the magnitude vector (``use_dora``); peft's DoRA forward divides by
  the same detached row norm ``||W0 + s B A||`` as ours.
* AdaLoRA: only the kept singular values (``rank_mask``): ``A = Q[kept]``,
  ``B = P[:, kept] * lam[kept]``; per module ``rank_pattern[m] = #kept`` and
  ``alpha_pattern[m] = scale * #kept`` so that peft's ``alpha_m / r_m`` equals our
  ``alpha / (r + 1e-5)``. Both patterns list every exported module (AdaLoRA ranks vary by
  design); ``r`` / ``lora_alpha`` hold the largest kept rank and its alpha.
* A module with no kept singular value contributes exactly nothing and is left out of
  ``target_modules`` (as peft's own LoRA conversion does). If no module keeps any rank, every
  module is exported at rank 1 with ``B = 0`` (an exact no-op) so the adapter still loads and
  carries its ``modules_to_save`` (e.g. the trained head).
* Hyper source: the generated factors (the model is put in eval mode and the factors are
  generated once under ``no_grad``, exactly as the evaluation forward caches them).

``target_modules`` is the list of exact adapted module names; if peft's suffix matching would
also catch another module of the model, an anchored regex of exactly those names is written
instead. ``modules_to_save`` lists the full names of the saved modules, whose tensors are stored
as peft stores them (``base_model.model.<module>.<tensor>``).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME
from .fileio import write_json, write_tensors

PEFT_PREFIX = "base_model.model."

# Class-name endings of transformers models -> peft task types.
_TASK_SUFFIXES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in _TASK_SUFFIXES:
        if name.endswith(suffix):
            return task
    return None


def _peft_targets_match(targets: list[str], key: str) -> bool:
    """peft's ``check_target_module_exists`` for a list of names (equality or ``.name`` suffix)."""
    return key in targets or any(key.endswith("." + t) for t in targets)


def _peft_pattern_key(pattern_keys: list[str], key: str) -> str:
    """peft's ``get_pattern_key``: the first pattern key matching ``key`` (else ``key`` itself)."""
    for pk in pattern_keys:
        if re.match(rf"(.*\.)?({pk})$", key):
            return pk
    return key


def _base_module_names(model) -> list[str]:
    """Module names of the wrapped model as peft will see them on a fresh base model."""
    adapted = list(model.adapted_layers)
    names = []
    for n, _ in model.model.named_modules():
        if n and not any(n.startswith(a + ".") for a in adapted):
            names.append(n)
    return names


def _saved_modules(model) -> list[str]:
    """Full names of the ``modules_to_save`` modules (outermost matches only)."""
    found = []
    for n, _ in model.model.named_modules():
        if any(n == s or n.endswith("." + s) for s in model.adapter_config.modules_to_save):
            if not any(n.startswith(f + ".") for f in found):
                found.append(n)
    return found


@torch.no_grad()
def _layer_lora(layer) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
    """``(A, B, scale, dropped_effective_lam)`` of one layer in eval mode.

    ``dropped_effective_lam`` is the AdaLoRA lam of the components left out (``None`` otherwise).
    """
    factors = layer.get_factors()
    method = layer.method.name
    if method != "adalora":
        a, b, scale = layer.method.effective_factors(layer, factors)
        return a.detach().clone(), b.detach().clone(), float(scale), None
    lam = factors["lam"]
    if layer.mask_in_forward:
        lam = lam * layer.rank_mask
    kept = layer.rank_mask > 0
    a = factors["Q"][kept].detach().clone()
    b = (factors["P"][:, kept] * lam[kept]).detach().clone()
    return a, b, float(layer.method.scaling(layer)), lam[~kept].detach()


def export_peft_lora(model, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Writes ``model``'s adapter as a standard peft LoRA adapter to ``directory``.

    Load it with ``peft.PeftModel.from_pretrained(base_model, directory)`` on a fresh copy of
    the base model; its outputs (and those of ``merge_and_unload()``) equal this model's in eval
    mode. The model's training mode is restored afterwards.

    Args:
        model: A trained :class:`~hyperadalora.AdaptedModel` (any method, any source).
        directory: Output directory (created if needed); existing files of the same names are
            replaced atomically.
        base_model_name_or_path: Recorded in ``adapter_config.json`` (default: the wrapped
            model's ``config._name_or_path`` when set).

    Returns:
        The directory path.

    Raises:
        TypeError: If ``model`` is not an :class:`~hyperadalora.AdaptedModel`.
        ValueError: If the model is merged (call ``model.unmerge()`` first), or an adapted module
            lies inside a ``modules_to_save`` module (peft cannot express that).
        RuntimeError: If an AdaLoRA model was trained without ``after_step`` ever running.
    """
    from .adapted_model import AdaptedModel

    if not isinstance(model, AdaptedModel):
        raise TypeError(f"export_peft_lora needs an AdaptedModel (from hyperadalora.wrap), got {type(model).__name__}")
    merged = [n for n, layer in model.adapted_layers.items() if layer.merged]
    if merged:
        raise ValueError(f"cannot export a merged model ({len(merged)} merged layer(s), first {merged[0]!r}): "
                         "the adapter is folded into the base weights; call model.unmerge() first")
    model.check_allocation_ran()
    saved = _saved_modules(model)
    inside = [n for n in model.adapted_layers for s in saved if n.startswith(s + ".")]
    if inside:
        raise ValueError(f"adapted module {inside[0]!r} lies inside a modules_to_save module; peft never adapts "
                         "modules inside modules_to_save, so this adapter cannot be exported as peft LoRA")

    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # also drops the hyper source's cached (training) generation
        with torch.no_grad():
            lora = {name: _layer_lora(layer) for name, layer in model.adapted_layers.items()}
            mts_tensors = {}
            for s in saved:
                for k, t in model.model.get_submodule(s).state_dict().items():
                    mts_tensors[f"{PEFT_PREFIX}{s}.{k}"] = t.detach().clone()
    finally:
        for m, mode in modes:
            m.training = mode
        if model.hyper is not None:
            model.hyper.invalidate()

    cfg = model.adapter_config
    is_adalora = cfg.method == "adalora"
    dropped = {n: d for n, (_, _, _, d) in lora.items() if d is not None and d.numel() and bool((d != 0).any())}
    if dropped:
        warnings.warn(
            f"{len(dropped)} AdaLoRA module(s) (first {next(iter(dropped))!r}) have pruned singular values that are "
            "still non-zero (the peft-style allocator zeroes them only at allocation steps); the export follows the "
            "allocator's rank pattern, as peft's AdaLoRA save does, so its outputs differ slightly from this model's",
            stacklevel=2,
        )

    exported = [n for n, (a, _, _, _) in lora.items() if a.shape[0] > 0]
    if not exported:  # nothing kept anywhere: an exact no-op adapter at rank 1 so it still loads
        for name, (a, b, scale, d) in list(lora.items()):
            layer = model.adapted_layers[name]
            a1 = torch.zeros(1, layer.in_features, dtype=a.dtype, device=a.device)
            b1 = torch.zeros(layer.out_features, 1, dtype=b.dtype, device=b.device)
            lora[name] = (a1, b1, scale, d)
        exported = list(lora)

    tensors: dict[str, torch.Tensor] = {}
    for name in exported:
        a, b, _, _ = lora[name]
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        if cfg.method == "dora":
            magnitude = model.adapted_layers[name].magnitude
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = magnitude.detach().clone()
    tensors.update(mts_tensors)

    # target_modules: the exact names, unless peft's suffix matching would catch another module.
    exported_set = set(exported)
    others = [n for n in _base_module_names(model) if n not in exported_set]
    if any(_peft_targets_match(exported, n) for n in others):
        target_modules: list[str] | str = "^(?:" + "|".join(re.escape(n) for n in exported) + ")$"
    else:
        target_modules = list(exported)

    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if is_adalora:
        ranks = {n: int(lora[n][0].shape[0]) for n in exported}
        r = max(ranks.values())
        scale = lora[exported[0]][2]
        lora_alpha = scale * r
        keys = dict(zip(exported, exported))
        if any(_peft_pattern_key(exported, n) != n for n in exported):
            keys = {n: "^" + re.escape(n) for n in exported}  # anchored: matches exactly one module
        rank_pattern = {keys[n]: ranks[n] for n in exported}
        alpha_pattern = {keys[n]: lora[n][2] * ranks[n] for n in exported}
    else:
        r, lora_alpha = cfg.r, float(cfg.lora_alpha)

    fan_in_fan_out = any(type(model.adapted_layers[n].base_layer).__name__ == "Conv1D" for n in exported)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model.model, "config", None), "_name_or_path", None) or None

    config = {
        "peft_type": "LORA",
        "task_type": _task_type(model.model),
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": int(r),
        "lora_alpha": lora_alpha,
        "target_modules": target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_bias": False,
        "use_rslora": False,
        "use_dora": cfg.method == "dora",
        "modules_to_save": saved or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "auto_mapping": None,
    }
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    write_tensors(path / WEIGHTS_NAME, tensors)
    write_json(path / CONFIG_NAME, config)  # last: a directory with a config is a complete adapter
    return path
