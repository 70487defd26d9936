"""Reading and writing adapter folders: safetensors weights + JSON config + allocator state.

The model's parts say what they hold: the factor source its factors or states
(``source.state_tensors()``), the method its per-layer state (``method.state_tensors(layer)``:
DoRA's magnitude, AdaLoRA's keep-mask), the allocator its policy state. This module never imports
:mod:`hyperadalora.adapted_model` (which uses it); :mod:`hyperadalora.checkpoint` adds
``load_adapter`` (wrap and load) on top.

Layout of an adapter directory::

    adapter_config.json          {"format_version", "library_version", "config", "modules"}
    adapter_model.safetensors    "<module>.<factor kind>" (direct) or "hyper.<state or parameter>"
                                 (hyper), "<module>.<method state>" (e.g. magnitude, rank_mask),
                                 "modules_to_save.<param>"
    allocator_state.safetensors  AdaLoRA importance EMAs and masks
    allocator_state.json         budget, rank pattern, step counters

Every file is written to a temporary name, fsynced and renamed, so a crash never leaves a
half-written adapter behind. Nothing is unpickled: weights are read with safetensors only.

"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import sharding
from .config import AdapterConfig
from .fileio import write_json, write_tensors
from .version import __version__

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ALLOC_TENSORS_NAME = "allocator_state.safetensors"
ALLOC_META_NAME = "allocator_state.json"


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """All adapter tensors of an :class:`~hyperadalora.AdaptedModel`, keyed as saved on disk."""
    out: dict[str, torch.Tensor] = dict(model.source.state_tensors())
    for name, layer in model.adapted_layers.items():
        for key, t in model.method.state_tensors(layer).items():
            out[f"{name}.{key}"] = t
    base = model.model
    for saved in model.adapter_config.modules_to_save:
        for mod_name, mod in base.named_modules():
            if mod_name == saved or mod_name.endswith("." + saved):
                for pname, p in mod.named_parameters():
                    out[f"modules_to_save.{mod_name}.{pname}"] = p
    return out


def whole_adapter_tensors(model) -> dict[str, torch.Tensor]:
    """:func:`adapter_state_dict` with every sharded (FSDP2) tensor gathered whole, detached (a
    collective when sharded: call it on every rank; the tensors themselves otherwise)."""
    return {key: sharding.full(t.detach()) for key, t in adapter_state_dict(model).items()}


def save_adapter(model, directory: str | os.PathLike, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Writes ``model``'s adapter to ``directory`` (created if needed).

    ``tensors`` replaces :func:`adapter_state_dict` (a sharded model's save passes the gathered
    whole tensors, see :func:`hyperadalora.integrations.distributed.save_adapter`).

    Files of an earlier save into the same folder that this save does not write (an AdaLoRA
    save's ``allocator_state.*`` under a LoRA save) are removed, so the folder holds one adapter.

    Raises:
        RuntimeError: If an AdaLoRA model was trained without ``after_step`` ever running.
        NotADirectoryError: ``directory`` is an existing file.
    """
    model.check_allocation_ran()
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"cannot save the adapter into {directory}: it is a file, not a folder")
    path.mkdir(parents=True, exist_ok=True)
    modules = {name: {"in_features": layer.in_features, "out_features": layer.out_features, "r": layer.r}
               for name, layer in model.adapted_layers.items()}
    write_tensors(path / WEIGHTS_NAME, adapter_state_dict(model) if tensors is None else tensors)
    if model.allocator.adaptive:
        write_tensors(path / ALLOC_TENSORS_NAME, model.allocator.state_dict())
        write_json(path / ALLOC_META_NAME, model.allocator.meta_dict())
    else:
        for stale in (ALLOC_TENSORS_NAME, ALLOC_META_NAME):  # of an earlier save; would mislead a reader
            (path / stale).unlink(missing_ok=True)
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
    saved_ranks = {name: info["r"] for name, info in modules.items()}
    if (model.allocator.compaction_enabled() and set(saved_ranks) == set(model.adapted_layers)
            and any(layer.r != saved_ranks[n] for n, layer in model.adapted_layers.items())):
        model.compact_to_ranks(saved_ranks)  # a compacted adapter: cut this model alike, then copy in
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
    for name, layer in model.adapted_layers.items():
        model.method.before_load(layer, {k: tensors[f"{name}.{k}"] for k in model.method.state_tensors(layer)})
    for key, target in own.items():
        sharding.copy_(target.data, tensors[key].to(dtype=target.dtype))  # a sharded target: this rank's shard
    _load_allocator_state(model, Path(directory))
    model.source.invalidate()


def _load_allocator_state(model, directory: Path) -> None:
    if not model.allocator.adaptive or not (directory / ALLOC_META_NAME).is_file():
        return
    meta = json.loads((directory / ALLOC_META_NAME).read_text())
    dev = next(iter(model.adapted_layers.values())).base_layer.weight.device  # no dequantisation
    alloc = {k: v.to(dev) for k, v in load_file(str(directory / ALLOC_TENSORS_NAME)).items()}
    model.allocator.load_state(alloc, meta)
    model.restore_steps_taken(max(model.steps_taken, meta.get("steps_seen", 0)))


__all__ = ["ALLOC_META_NAME", "ALLOC_TENSORS_NAME", "CONFIG_NAME", "FORMAT_VERSION", "WEIGHTS_NAME",
           "adapter_state_dict", "load_adapter_weights", "read_adapter_config", "save_adapter",
           "whole_adapter_tensors"]
