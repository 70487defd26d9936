"""Export any trained hyperadalora model as a plain peft LoRA adapter.

The exported directory is what ``peft.PeftModel.from_pretrained(base_model, directory)`` reads
(``adapter_config.json`` + ``adapter_model.safetensors``, peft's key names), so the
hypernetwork and the allocator are a training-time cost only: the served adapter is LoRA.

Conversion, always with evaluation semantics (dropout off, DyLoRA at full rank, generated
factors as the evaluation forward uses them); each method's ``to_lora`` does its part:

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

``pad_rank=N`` pads every module to rank N with zeros (``B A`` unchanged; differing scales are
folded into ``B``), so the adapter has one ``r`` and one ``lora_alpha`` for servers with a single
maximum LoRA rank (vLLM's ``max_lora_rank``); a module above N is refused before anything is
written. The files go into a temporary sibling folder that is moved in when complete
(:func:`~hyperadalora.fileio.publish_dir`).

``target_modules`` is the list of exact adapted module names; if peft's suffix matching would
also catch another module of the model, an anchored regex of exactly those names is written
instead. ``modules_to_save`` lists the full names of the saved modules, whose tensors are stored
as peft stores them (``base_model.model.<module>.<tensor>``).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from .adapted_model import AdaptedModel
from .adapter_io import CONFIG_NAME, WEIGHTS_NAME
from .fileio import publish_dir, staging_dir, write_json, write_tensors
from .methods import LoraExport

PEFT_PREFIX = "base_model.model."

# Class-name endings of transformers models -> peft task types.
_TASK_SUFFIXES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


# Heads peft adds to modules_to_save by itself for these task types (and then expects in the file).
_PEFT_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                    "QUESTION_ANS": ("qa_outputs",)}


def _task_type(model: nn.Module, saved: list[str]) -> str | None:
    """peft's task type for ``model``; ``None`` for a head task whose head the adapter did not save
    (peft would add the head to modules_to_save and fail to find its weights in the file)."""
    name = type(model).__name__
    for suffix, task in _TASK_SUFFIXES:
        if name.endswith(suffix):
            heads = _PEFT_TASK_HEADS.get(task, ())
            if heads and not any(s == h or s.endswith("." + h) for s in saved for h in heads):
                return None
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


def _base_module_names(model: AdaptedModel) -> list[str]:
    """Module names of the wrapped model as peft will see them on a fresh base model."""
    adapted = list(model.adapted_layers)
    names = []
    for n, _ in model.model.named_modules():
        if n and not any(n.startswith(a + ".") for a in adapted):
            names.append(n)
    return names


def _saved_modules(model: AdaptedModel) -> list[str]:
    """Full names of the ``modules_to_save`` modules (outermost matches only)."""
    found = []
    for n, _ in model.model.named_modules():
        if any(n == s or n.endswith("." + s) for s in model.adapter_config.modules_to_save):
            if not any(n.startswith(f + ".") for f in found):
                found.append(n)
    return found


def _check_exportable(model, saved: list[str]) -> None:
    if not isinstance(model, AdaptedModel):
        raise TypeError(f"export_peft_lora needs an AdaptedModel (from hyperadalora.wrap), got {type(model).__name__}")
    merged = [n for n, layer in model.adapted_layers.items() if layer.merged]
    if merged:
        raise ValueError(f"cannot export a merged model ({len(merged)} merged layer(s), first {merged[0]!r}): "
                         "the adapter is folded into the base weights; call model.unmerge() first")
    model.check_allocation_ran()
    inside = [n for n in model.adapted_layers for s in saved if n.startswith(s + ".")]
    if inside:
        raise ValueError(f"adapted module {inside[0]!r} lies inside a modules_to_save module; peft never adapts "
                         "modules inside modules_to_save, so this adapter cannot be exported as peft LoRA")


def _collect(model: AdaptedModel, saved: list[str]) -> tuple[dict[str, LoraExport], dict[str, torch.Tensor]]:
    """Every layer as LoRA (in eval mode) and the saved modules' tensors; restores training modes."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # also drops the hyper source's cached (training) generation
        with torch.no_grad():
            lora = {name: model.method.to_lora(layer, layer.get_factors())
                    for name, layer in model.adapted_layers.items()}
            mts_tensors = {}
            for s in saved:
                for k, t in model.model.get_submodule(s).state_dict().items():
                    mts_tensors[f"{PEFT_PREFIX}{s}.{k}"] = t.detach().clone()
    finally:
        for m, mode in modes:
            m.training = mode
        model.source.invalidate()
    return lora, mts_tensors


def _warn_dropped(lora: dict[str, LoraExport]) -> None:
    dropped = [n for n, e in lora.items() if e.dropped is not None and e.dropped.numel() and bool((e.dropped != 0).any())]
    if dropped:
        warnings.warn(
            f"{len(dropped)} AdaLoRA module(s) (first {dropped[0]!r}) have pruned singular values that are "
            "still non-zero (the peft-style allocator zeroes them only at allocation steps); the export follows the "
            "allocator's rank pattern, as peft's AdaLoRA save does, so its outputs differ slightly from this model's",
            stacklevel=3,
        )


def _exported_modules(model: AdaptedModel, lora: dict[str, LoraExport]) -> list[str]:
    """Modules with at least one rank component; if none has any, every module as an exact no-op at
    rank 1 (``B = 0``) so the adapter still loads and carries its ``modules_to_save``."""
    exported = [n for n, e in lora.items() if e.rank > 0]
    if exported:
        return exported
    for name, e in lora.items():
        layer = model.adapted_layers[name]
        e.a = torch.zeros(1, layer.in_features, dtype=e.a.dtype, device=e.a.device)
        e.b = torch.zeros(layer.out_features, 1, dtype=e.b.dtype, device=e.b.device)
        e.alpha = e.scale
    return list(lora)


def _check_pad_rank_value(pad_rank: int | None) -> None:
    if pad_rank is not None and (isinstance(pad_rank, bool) or not isinstance(pad_rank, int) or pad_rank < 1):
        raise ValueError(f"pad_rank must be a positive int (the server's maximum LoRA rank), got {pad_rank!r}")


def check_pad_rank(lora: dict[str, LoraExport], exported: list[str], pad_rank: int) -> None:
    """Raises (naming the module and its rank) if a module's rank exceeds ``pad_rank``."""
    over = sorted((n for n in exported if lora[n].rank > pad_rank), key=lambda n: -lora[n].rank)
    if over:
        raise ValueError(f"cannot pad to rank {pad_rank}: module {over[0]!r} has rank {lora[over[0]].rank} "
                         f"({len(over)} module(s) exceed it); pass a pad rank of at least "
                         f"{lora[over[0]].rank} (and raise the server's maximum LoRA rank to match)")


def pad_to_rank(lora: dict[str, LoraExport], exported: list[str], pad_rank: int) -> None:
    """Pads every exported module to rank ``pad_rank`` with zero rows of ``A`` / zero columns of
    ``B`` (the product ``B A`` is unchanged). If the modules' scales differ (mixed ranks with one
    alpha), each scale is folded into ``B`` and a common scale of 1 is used, so the adapter needs
    one ``r`` and one ``lora_alpha`` (``alpha / r`` = the scale) and no per-module patterns, which
    some servers ignore."""
    scales = {lora[n].scale for n in exported}
    common = scales.pop() if len(scales) == 1 else 1.0
    for name in exported:
        e = lora[name]
        extra = pad_rank - e.rank
        b = e.b if e.scale == common else e.b * (e.scale / common)
        e.a = torch.cat([e.a, e.a.new_zeros(extra, e.a.shape[1])], dim=0)  # (pad_rank, d_in)
        e.b = torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)  # (d_out, pad_rank)
        e.scale, e.alpha = common, common * pad_rank


def _peft_tensors(lora: dict[str, LoraExport], exported: list[str]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name in exported:
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora[name].a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora[name].b
        for suffix, t in lora[name].extra.items():
            tensors[f"{PEFT_PREFIX}{name}.{suffix}"] = t
    return tensors


def _target_modules(model: AdaptedModel, exported: list[str]) -> list[str] | str:
    """The exact names, unless peft's suffix matching would catch another module (then a regex)."""
    exported_set = set(exported)
    others = [n for n in _base_module_names(model) if n not in exported_set]
    if any(_peft_targets_match(exported, n) for n in others):
        return "^(?:" + "|".join(re.escape(n) for n in exported) + ")$"
    return list(exported)


def _ranks_and_alphas(model: AdaptedModel, lora: dict[str, LoraExport], exported: list[str], padded: bool
                      ) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """``(r, lora_alpha, rank_pattern, alpha_pattern)``: patterns list every module when ranks vary
    by design (AdaLoRA, unless padded to one rank) or differ; ``r`` / ``lora_alpha`` then hold the
    largest rank and its alpha."""
    ranks = {n: lora[n].rank for n in exported}
    alphas = {n: lora[n].alpha for n in exported}
    first = exported[0]
    if len(set(ranks.values())) == 1 and len(set(alphas.values())) == 1 and (
            padded or not model.method.varies_rank):
        return ranks[first], alphas[first], {}, {}
    r = max(ranks.values())
    keys = dict(zip(exported, exported))
    if any(_peft_pattern_key(exported, n) != n for n in exported):
        keys = {n: "^" + re.escape(n) for n in exported}  # anchored: matches exactly one module
    return r, lora[first].scale * r, {keys[n]: ranks[n] for n in exported}, {keys[n]: alphas[n] for n in exported}


def _peft_config(model: AdaptedModel, lora: dict[str, LoraExport], exported: list[str], saved: list[str],
                 base_model_name_or_path: str | None, padded: bool = False) -> dict:
    r, lora_alpha, rank_pattern, alpha_pattern = _ranks_and_alphas(model, lora, exported, padded)
    fan_in_fan_out = any(type(model.adapted_layers[n].base_layer).__name__ == "Conv1D" for n in exported)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model.model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model.model, saved),
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": int(r),
        "lora_alpha": lora_alpha,
        "target_modules": _target_modules(model, exported),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_bias": False,
        "use_rslora": False,
        "use_dora": model.method.peft_use_dora,
        "modules_to_save": saved or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "auto_mapping": None,
    }


def check_export_dir(directory: str | os.PathLike, *, protected: list[str | os.PathLike] = (),
                     force: bool = False) -> None:
    """Refuses an export target that is a file, lies inside a ``protected`` folder (a run's own
    ``adapter/`` or ``checkpoints/``: the export would overwrite what it was made from), or is a
    non-empty folder (unless ``force``).

    Raises:
        NotADirectoryError: ``directory`` is an existing file.
        FileExistsError: Inside a protected folder, or non-empty without ``force``.
    """
    path = Path(directory).expanduser().absolute().resolve()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"export target {directory} is a file, not a folder: give a folder path")
    for guarded in protected:
        guarded = Path(guarded).expanduser().absolute().resolve()
        if path == guarded or guarded in path.parents:
            raise FileExistsError(f"export target {directory} lies inside {guarded}, which the run (or the export "
                                  "itself) reads from: choose another --out")
    if not force and path.is_dir() and any(path.iterdir()):
        raise FileExistsError(f"export target {directory} is not empty: choose an empty or new folder, or pass "
                              "--force to replace its files")


def export_peft_lora(model, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                     pad_rank: int | None = None) -> Path:
    """Writes ``model``'s adapter as a standard peft LoRA adapter to ``directory``.

    Load it with ``peft.PeftModel.from_pretrained(base_model, directory)`` on a fresh copy of
    the base model; its outputs (and those of ``merge_and_unload()``) equal this model's in eval
    mode. The model's training mode is restored afterwards. The files are written into a
    temporary sibling folder first and moved in only when all are complete, so a failure leaves
    ``directory`` as it was.

    Args:
        model: A trained :class:`~hyperadalora.AdaptedModel` (any method, any source).
        directory: Output directory (created if needed); existing files of the same names are
            replaced, other files are kept.
        base_model_name_or_path: Recorded in ``adapter_config.json`` (default: the wrapped
            model's ``config._name_or_path`` when set).
        pad_rank: Pad every module to this rank with zeros (outputs unchanged), for servers with
            one maximum LoRA rank (vLLM's ``max_lora_rank``); the config then holds a single
            ``r`` / ``lora_alpha`` and no ``rank_pattern`` / ``alpha_pattern`` (differing
            scales are folded into ``B``).

    Returns:
        The directory path.

    Raises:
        TypeError: If ``model`` is not an :class:`~hyperadalora.AdaptedModel`.
        ValueError: If the model is merged (call ``model.unmerge()`` first), an adapted module
            lies inside a ``modules_to_save`` module (peft cannot express that), or a module's
            rank exceeds ``pad_rank`` (checked before anything is written).
        RuntimeError: If an AdaLoRA model was trained without ``after_step`` ever running.
    """
    saved = _saved_modules(model) if isinstance(model, AdaptedModel) else []
    _check_exportable(model, saved)
    _check_pad_rank_value(pad_rank)
    path = Path(directory)
    check_export_dir(path, force=True)
    lora, mts_tensors = _collect(model, saved)
    _warn_dropped(lora)
    exported = _exported_modules(model, lora)
    if pad_rank is not None:
        check_pad_rank(lora, exported, pad_rank)
        pad_to_rank(lora, exported, pad_rank)
    tensors = {**_peft_tensors(lora, exported), **mts_tensors}
    config = _peft_config(model, lora, exported, saved, base_model_name_or_path, padded=pad_rank is not None)
    tmp = staging_dir(path)
    try:
        write_tensors(tmp / WEIGHTS_NAME, tensors)
        write_json(tmp / CONFIG_NAME, config)
        publish_dir(tmp, path, last=CONFIG_NAME)  # last: a directory with a config is a complete adapter
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
