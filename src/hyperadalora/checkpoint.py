"""Saving and loading adapters: safetensors weights + JSON config + allocator state.

Layout of an adapter directory::

    adapter_config.json          {"format_version", "library_version", "config", "modules"}
    adapter_model.safetensors    "<module>.<factor kind>", "<module>.magnitude" (DoRA),
                                 "<module>.rank_mask" (AdaLoRA), "modules_to_save.<param>"
    allocator_state.safetensors  AdaLoRA importance EMAs and masks
    allocator_state.json         budget, rank pattern, step counters

Every file is written to a temporary name, fsynced and renamed, so a crash never leaves a
half-written adapter behind. Nothing is unpickled: weights are read with safetensors only.

A folder of files can carry a ``manifest.json`` (:func:`write_manifest`: every file's size and
SHA-256, written last); :func:`verify_checkpoint` recomputes them and raises
:class:`CorruptCheckpointError`, naming the file, for a missing, extra, truncated or altered one.
Training checkpoints (``hyperadalora.train.resume``) are such folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .config import AdapterConfig
from .fileio import CorruptCheckpointError, verify_checkpoint, write_json, write_manifest, write_tensors

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ALLOC_TENSORS_NAME = "allocator_state.safetensors"
ALLOC_META_NAME = "allocator_state.json"


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """All adapter tensors of an :class:`~hyperadalora.AdaptedModel`, keyed as saved on disk."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in model.adapted_layers.items():
        for kind, t in layer.factors.items():
            out[f"{name}.{kind}"] = t
        if hasattr(layer, "magnitude"):
            out[f"{name}.magnitude"] = layer.magnitude
        if hasattr(layer, "rank_mask"):
            out[f"{name}.rank_mask"] = layer.rank_mask
    if model.hyper is not None:
        for key, t in model.hyper.state_dict().items():
            out[f"hyper.{key}"] = t
    base = model.model
    for saved in model.adapter_config.modules_to_save:
        for mod_name, mod in base.named_modules():
            if mod_name == saved or mod_name.endswith("." + saved):
                for pname, p in mod.named_parameters():
                    out[f"modules_to_save.{mod_name}.{pname}"] = p
    return out


def save_adapter(model, directory: str | os.PathLike) -> Path:
    """Writes ``model``'s adapter to ``directory`` (created if needed).

    Raises:
        RuntimeError: If an AdaLoRA model was trained without ``after_step`` ever running.
    """
    model.check_allocation_ran()
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    from . import __version__

    modules = {name: {"in_features": layer.in_features, "out_features": layer.out_features, "r": layer.r}
               for name, layer in model.adapted_layers.items()}
    write_tensors(path / WEIGHTS_NAME, adapter_state_dict(model))
    if model.allocator is not None:
        write_tensors(path / ALLOC_TENSORS_NAME, model.allocator.state_dict())
        write_json(path / ALLOC_META_NAME, model.allocator.meta_dict())
    # The config goes last: a directory with a config is a complete adapter.
    write_json(path / CONFIG_NAME, {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "base_model_class": type(model.model).__name__,
        "config": model.adapter_config.to_dict(),
        "modules": modules,
    })
    return path


def read_adapter_config(directory: str | os.PathLike) -> tuple[AdapterConfig, dict]:
    """Reads ``adapter_config.json``: the :class:`AdapterConfig` and the saved module table."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a saved hyperadalora adapter "
                                "(save one with model.save_adapter(directory))")
    data = json.loads(path.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {data.get('format_version')!r} "
                         f"(this library reads {FORMAT_VERSION})")
    return AdapterConfig.from_dict(data["config"]), data["modules"]


def _check_shapes(model, modules: dict, directory) -> None:
    for name, info in modules.items():
        layer = model.adapted_layers.get(name)
        if layer is None:
            raise ValueError(f"adapter in {directory} has module {name!r}, which this model does not have "
                             f"(its adapted modules start with {list(model.adapted_layers)[:3]})")
        got = (layer.out_features, layer.in_features, layer.r)
        want = (info["out_features"], info["in_features"], info["r"])
        if got != want:
            raise ValueError(
                f"adapter in {directory} does not fit this model: module {name!r} is (out={got[0]}, in={got[1]}, "
                f"r={got[2]}) here but (out={want[0]}, in={want[1]}, r={want[2]}) in the adapter; load it onto the "
                "base model it was trained on"
            )


@torch.no_grad()
def load_adapter_weights(model, directory: str | os.PathLike) -> None:
    """Loads weights and allocator state from ``directory`` into an already wrapped model."""
    _, modules = read_adapter_config(directory)
    _check_shapes(model, modules, directory)
    tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
    own = adapter_state_dict(model)
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise ValueError(f"{Path(directory) / WEIGHTS_NAME} lacks {len(missing)} tensor(s), first: {missing[0]!r}")
    for key, target in own.items():
        src = tensors[key]
        if src.shape != target.shape:
            raise ValueError(f"{Path(directory) / WEIGHTS_NAME}: tensor {key!r} has shape {tuple(src.shape)}, "
                             f"the model expects {tuple(target.shape)}")
        target.data.copy_(src.to(dtype=target.dtype, device=target.device))
    if model.allocator is not None and (Path(directory) / ALLOC_META_NAME).is_file():
        meta = json.loads((Path(directory) / ALLOC_META_NAME).read_text())
        dev = next(iter(model.adapted_layers.values())).rank_mask.device
        alloc = {k: v.to(dev) for k, v in load_file(str(Path(directory) / ALLOC_TENSORS_NAME)).items()}
        model.allocator.load_state(alloc, meta)
        model._after_step_calls = max(model._after_step_calls, meta.get("steps_seen", 0))
    if model.hyper is not None:
        model.hyper.invalidate()


def load_adapter(model: nn.Module, directory: str | os.PathLike):
    """Wraps a base model with the adapter saved in ``directory``.

    Args:
        model: The base model the adapter was trained on (modified in place).
        directory: A directory written by :meth:`AdaptedModel.save_adapter`.

    Returns:
        The :class:`~hyperadalora.AdaptedModel` with the saved weights and allocator state.

    Raises:
        ValueError: If the adapter's module shapes differ from the model's (the message names the
            first mismatching module).
    """
    from .adapted_model import wrap

    config, modules = read_adapter_config(directory)
    wrapped = wrap(model, config)
    load_adapter_weights(wrapped, directory)
    return wrapped


__all__ = ["CorruptCheckpointError", "load_adapter", "load_adapter_weights", "read_adapter_config", "save_adapter",
           "verify_checkpoint", "write_manifest"]
