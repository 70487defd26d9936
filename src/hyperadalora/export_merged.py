"""Export a trained model with its adapter folded into the weights, as a plain transformers model.

The folder (``config.json``, safetensors weights, generation config, tokenizer files) is what
``AutoModelFor....from_pretrained(directory)`` reads with neither hyperadalora nor peft: every
adapted layer's weight is replaced by the method's merged weight (evaluation semantics: dropout
off, DyLoRA at full rank, AdaLoRA's kept singular values, DoRA's magnitude-scaled direction,
the hyper source's generated factors), and ``modules_to_save`` (a trained head) is saved as it
is, being part of the model.

The merge never changes the model: the merged weights are put in place only while
``save_pretrained`` runs, and the original weight tensors are put back afterwards.

A quantised base (bitsandbytes 4-bit / 8-bit) is refused unless ``dequantize=True``: merging into
a packed weight would round the update away. With it, the base is dequantised in place to its
compute dtype (transformers' ``model.dequantize``), and a full-precision model is written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .adapted_model import AdaptedModel
from .export import check_export_dir
from .fileio import publish_dir, staging_dir
from .quant import QuantizedMergeError, dequantize_model_, is_quantized

MERGED_CONFIG_NAME = "config.json"
# An earlier export's files in a reused (--force) folder that a loader would read beside ours:
# other weight shards, or a peft adapter (transformers loads a folder with adapter_config.json
# as an adapter).
STALE_FILES = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
               "pytorch_model.bin.index.json", "adapter_config.json", "adapter_model.safetensors",
               "adapter_model.bin")


def quantized_modules(model: AdaptedModel) -> list[str]:
    """Names of the bitsandbytes layers in the wrapped model (adapted bases included)."""
    return [n for n, m in model.model.named_modules() if is_quantized(m)]


def _check_tied(model: AdaptedModel) -> None:
    counts = Counter(id(p) for _, p in model.model.named_parameters(remove_duplicate=False))
    for name, layer in model.adapted_layers.items():
        if counts[id(layer.base_layer.weight)] > 1:
            raise ValueError(f"adapted module {name!r} shares its weight with another module (tied embeddings): "
                             "merging would change both; export the adapter as peft LoRA (--out) instead")


def _check_mergeable(model, dequantize: bool) -> list[str]:
    """Refuses what cannot be written as a merged model; returns the quantised modules."""
    if not isinstance(model, AdaptedModel):
        raise TypeError(f"export_merged needs an AdaptedModel (from hyperadalora.wrap), got {type(model).__name__}")
    if not hasattr(model.model, "save_pretrained"):
        raise TypeError(f"export_merged writes a transformers model folder, but the wrapped model is a "
                        f"{type(model.model).__name__} without save_pretrained; use export_peft_lora, or "
                        "model.unwrap(merge=True) and save it yourself")
    merged = [n for n, layer in model.adapted_layers.items() if layer.merged]
    if merged:
        raise ValueError(f"the model is merged already ({len(merged)} merged layer(s), first {merged[0]!r}); "
                         "call model.unmerge() first")
    model.check_allocation_ran()
    _check_tied(model)
    quantized = quantized_modules(model)
    if quantized and not dequantize:
        raise QuantizedMergeError(
            f"cannot merge into a quantised base ({len(quantized)} bitsandbytes layer(s), first {quantized[0]!r}: "
            f"{type(model.model.get_submodule(quantized[0])).__name__}): re-quantising would round the update "
            "away. Pass --dequantize (dequantize=True) to write a full-precision merged model, or export the "
            "adapter (--out, peft LoRA) and serve it on the quantised base")
    return quantized


@contextlib.contextmanager
def merged_view(model: AdaptedModel) -> Iterator[nn.Module]:
    """Yields the wrapped model with plain base layers holding the merged weights in place of the
    adapted layers; restores the adapted layers, their weight tensors and every training mode."""
    modes = [(m, m.training) for m in model.modules()]
    swapped: list[tuple[str, nn.Module, nn.Parameter]] = []
    try:
        model.eval()  # evaluation semantics; also drops the hyper source's training generation
        with torch.no_grad():
            for name, layer in model.adapted_layers.items():
                merged = model.method.merged_weight(layer, layer.get_factors())  # (d_out, d_in)
                original = layer.base_layer.weight
                layer.base_layer.weight = nn.Parameter(original.detach().clone(), requires_grad=False)
                swapped.append((name, layer, original))
                layer.set_base_weight(merged)  # into the clone, in the layer's own layout
                model.model.set_submodule(name, layer.base_layer)
        yield model.model
    finally:
        for name, layer, original in reversed(swapped):
            model.model.set_submodule(name, layer)
            layer.base_layer.weight = original
            layer.base_layer_replaced()  # drops the row-norm cache computed from the merged weight
        for m, mode in modes:
            m.training = mode
        model.source.invalidate()


def _dequantize(model: AdaptedModel, quantized: list[str]) -> None:
    dtype = dequantize_model_(model.model)
    for layer in model.adapted_layers.values():
        layer.base_layer_replaced()
    warnings.warn(f"dequantised {len(quantized)} bitsandbytes layer(s) of the base to {dtype} in place before "
                  "merging; the merged model is written in full precision (several times larger than the "
                  "quantised base), with the quantised weights' rounding kept", stacklevel=3)


def export_merged(model, directory: str | os.PathLike, *, tokenizer=None, dequantize: bool = False) -> Path:
    """Writes ``model`` with its adapter merged into the weights as a transformers model folder.

    ``AutoModelFor<Task>.from_pretrained(directory)`` loads it alone (no hyperadalora, no peft)
    and gives this model's evaluation outputs. The model itself is left unchanged (unless
    ``dequantize`` dequantises its base). The files are written into a temporary sibling folder
    and moved in only when all are complete, so a failure leaves ``directory`` as it was.

    Args:
        model: A trained :class:`~hyperadalora.AdaptedModel` over a transformers model.
        directory: Output folder (created if needed); files of the same names are replaced, an
            earlier export's weight or adapter files are removed, other files are kept.
        tokenizer: Saved beside the model when given (``save_pretrained``).
        dequantize: Allow a bitsandbytes-quantised base: it is dequantised in place (to its
            compute dtype) and the merged model is written in full precision (with a warning).

    Returns:
        The directory path.

    Raises:
        TypeError: ``model`` is not an AdaptedModel, or wraps no transformers model.
        ValueError: The model is merged already, or an adapted weight is tied to another module.
        QuantizedMergeError: The base is quantised and ``dequantize`` is false.
        RuntimeError: An AdaLoRA model was trained without ``after_step`` ever running.
    """
    quantized = _check_mergeable(model, dequantize)
    path = Path(directory)
    check_export_dir(path, force=True)
    if quantized:
        _dequantize(model, quantized)
    tmp = staging_dir(path)
    try:
        with merged_view(model) as plain:
            plain.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        publish_dir(tmp, path, last=MERGED_CONFIG_NAME, stale=STALE_FILES)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


__all__ = ["export_merged", "merged_view", "quantized_modules"]
