"""Saving and loading adapters (the public face of :mod:`hyperadalora.adapter_io`).

Layout of an adapter directory::

    adapter_config.json          {"format_version", "library_version", "config", "modules"}
    adapter_model.safetensors    factors or hypernetwork states, method state, saved modules
    allocator_state.safetensors  importance scores and masks (adaptive allocators only)
    allocator_state.json         budget, rank pattern, step counters

Every file is written to a temporary name, fsynced and renamed, so a crash never leaves a
half-written adapter behind. Nothing is unpickled: weights are read with safetensors only.

A folder of files can carry a ``manifest.json`` (:func:`write_manifest`: every file's size and
SHA-256, written last); :func:`verify_checkpoint` recomputes them and raises
:class:`CorruptCheckpointError`, naming the file, for a missing, extra, truncated or altered one.
Training checkpoints (``hyperadalora.train.resume``) are such folders.
"""

from __future__ import annotations

import dataclasses

import os

from torch import nn

from .adapted_model import AdaptedModel, wrap
from .adapter_io import (ALLOC_META_NAME, ALLOC_TENSORS_NAME, CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME,
                         adapter_state_dict, load_adapter_weights, read_adapter_config, save_adapter)
from .fileio import CorruptCheckpointError, verify_checkpoint, write_manifest


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> AdaptedModel:
    """Wraps a base model with the adapter saved in ``directory``.

    Args:
        model: The base model the adapter was trained on (modified in place).
        directory: A directory written by :meth:`AdaptedModel.save_adapter`.

    Returns:
        The :class:`~hyperadalora.AdaptedModel` with the saved weights and allocator state.

    Raises:
        ValueError: If the adapter's module shapes differ from the model's (the message names the
            first mismatching module). The model is then left as it was (no adapter layers, the
            same parameters trainable).
    """
    config, _ = read_adapter_config(directory)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    # The saved weights replace whatever init_from would give: its source need not exist here.
    wrapped = wrap(model, dataclasses.replace(config, init_from=None))
    try:
        load_adapter_weights(wrapped, directory)
    except BaseException:
        # leave the user's model as it was: original layers back, the same parameters trainable
        wrapped.unwrap(merge=False)
        for name, p in model.named_parameters():
            p.requires_grad_(trainable.get(name, p.requires_grad))
        raise
    return wrapped


__all__ = ["ALLOC_META_NAME", "ALLOC_TENSORS_NAME", "CONFIG_NAME", "CorruptCheckpointError", "FORMAT_VERSION",
           "WEIGHTS_NAME", "adapter_state_dict", "load_adapter", "load_adapter_weights", "read_adapter_config",
           "save_adapter", "verify_checkpoint", "write_manifest"]
