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

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ALLOC_TENSORS_NAME = "allocator_state.safetensors"
ALLOC_META_NAME = "allocator_state.json"
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def _atomic_write(path: Path, write) -> None:
    """Writes through ``write(tmp)`` into a temporary file, fsyncs it, and renames it over ``path``.

    Refuses to replace anything but a regular file: renaming over ``/dev/null`` (a user's
    ``--out /dev/null``) would replace the device node for the whole machine.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} exists and is not a regular file (a device, folder or pipe); refusing to "
                         "replace it: give the path of a file")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, data: Any, *, sort_keys: bool = True, default=None) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=sort_keys, default=default)
            fh.write("\n")

    _atomic_write(path, write)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}))


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
    _write_tensors(path / WEIGHTS_NAME, adapter_state_dict(model))
    if model.allocator is not None:
        _write_tensors(path / ALLOC_TENSORS_NAME, model.allocator.state_dict())
        _write_json(path / ALLOC_META_NAME, model.allocator.meta_dict())
    # The config goes last: a directory with a config is a complete adapter.
    _write_json(path / CONFIG_NAME, {
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


# -- manifests: checksums of a folder's files ---------------------------------------------------

class CorruptCheckpointError(ValueError):
    """A checkpoint folder is incomplete or damaged (a file is missing, extra, truncated or altered).

    The message names the file and says what to do. Raised by :func:`verify_checkpoint`; a
    resumed run skips such a checkpoint and uses the previous good one.

    Attributes:
        path: The offending file (or the folder's ``manifest.json``).
        checkpoint: The checkpoint folder.
    """

    def __init__(self, message: str, path: str | os.PathLike, checkpoint: str | os.PathLike) -> None:
        super().__init__(message)
        self.path = Path(path)
        self.checkpoint = Path(checkpoint)


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_files(directory: Path) -> list[str]:
    """Relative POSIX paths of every file below ``directory`` except the manifest, sorted."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if not p.is_dir() and p.relative_to(directory).as_posix() != MANIFEST_NAME)


def write_manifest(directory: str | os.PathLike, **extra: Any) -> dict:
    """Writes ``directory/manifest.json``: the size and SHA-256 of every file in the folder.

    Call it after every other file is complete: the checksums are computed from the files as
    they are on disk, and a folder whose manifest is missing counts as incomplete.

    Args:
        directory: The folder (its files are listed recursively, by relative POSIX path).
        **extra: JSON values stored next to ``files`` (e.g. ``step=100``).

    Returns:
        The manifest written: ``{"format_version", **extra, "files": {name: {"size", "sha256"}}}``.
    """
    directory = Path(directory)
    files = {name: {"size": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
             for name in _folder_files(directory)}
    manifest = {"format_version": MANIFEST_VERSION, **extra, "files": files}
    _write_json(directory / MANIFEST_NAME, manifest)
    return manifest


def verify_checkpoint(directory: str | os.PathLike) -> dict:
    """Checks every file of a folder against its ``manifest.json``.

    Args:
        directory: A folder written with :func:`write_manifest` (e.g. a training checkpoint
            ``RUN_DIR/checkpoints/step-<N>``).

    Returns:
        The manifest.

    Raises:
        CorruptCheckpointError: The manifest is missing or unreadable (the folder was still being
            written), or a file is missing, not listed, of another size (truncated) or of another
            checksum; the message names the file.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    advice = (f"delete {directory} (a resumed run falls back to the previous good checkpoint "
              "by itself)")
    if not manifest_path.is_file():
        raise CorruptCheckpointError(f"incomplete checkpoint: {manifest_path} is missing (the checkpoint was still "
                                     f"being written when the run stopped); {advice}", manifest_path, directory)
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or manifest.get("format_version") != MANIFEST_VERSION:
            raise ValueError("unexpected layout")
        sizes = {name: int(entry["size"]) for name, entry in files.items()}
        sums = {name: str(entry["sha256"]) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(f"corrupt checkpoint: {manifest_path} is not a valid manifest ({exc}); {advice}",
                                     manifest_path, directory) from exc
    present = _folder_files(directory)
    extra = sorted(set(present) - set(files))
    if extra:
        raise CorruptCheckpointError(f"corrupt checkpoint: {directory / extra[0]} is not listed in {manifest_path}; "
                                     f"{advice}", directory / extra[0], directory)
    for name in sorted(files):
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpointError(f"corrupt checkpoint: {path} is missing (listed in {manifest_path}); {advice}",
                                         path, directory)
        size = path.stat().st_size
        if size != sizes[name]:
            what = "truncated" if size < sizes[name] else "longer than written"
            raise CorruptCheckpointError(f"corrupt checkpoint: {path} is {what} ({size} bytes, the manifest says "
                                         f"{sizes[name]}); {advice}", path, directory)
        if file_sha256(path) != sums[name]:
            raise CorruptCheckpointError(f"corrupt checkpoint: {path} does not match its SHA-256 in {manifest_path} "
                                         f"(the file was altered or damaged on disk); {advice}", path, directory)
    return manifest


def _fsync_dir(directory: Path) -> None:
    """Makes a folder's entries (renames, new files) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, target: Path) -> None:
    """Swaps the complete folder ``tmp`` in as ``target`` (the old ``target`` is removed after)."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    _fsync_dir(tmp)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    _fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old)
