"""Quantised base layers (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``) and precisions.

An adapted layer over a quantised base runs the base forward through the quantised layer itself
(its packed weight is never materialised for the forward or saved for the backward) and adds
the low-rank term; what needs ``W0`` as a matrix (DoRA's row norms, PiSSA, merging) gets it by
dequantisation (:func:`dequantized_weight`). Merging into a quantised weight is refused
(:class:`QuantizedMergeError`): re-quantising would round the update away.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

QUANTIZED_LAYER_TYPES = ("Linear4bit", "Linear8bitLt")
QUANTIZE_CHOICES = ("4bit", "8bit", "nf4", "fp4")  # "4bit" is NF4 with double quantisation (QLoRA)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class QuantizedMergeError(RuntimeError):
    """Raised when an adapter would be merged into (or replace) a quantised base weight."""


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer (matched by class name,
    so bitsandbytes is imported only by whoever made the layer)."""
    return any(cls.__name__ in QUANTIZED_LAYER_TYPES for cls in type(module).__mro__)


def keep_trainable_4bit_layout_(model: nn.Module) -> int:
    """Stops bitsandbytes from repacking ``model``'s 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) rewrites a ``Linear4bit`` weight in place, at
    its first eval-mode forward without gradients (an evaluation), into a layout that only that
    kernel reads. After that, dequantisation (merge, export, DoRA's norms) returns scrambled
    weights, a training forward passes no gradient back through the layer (the adapters below it
    stop learning, silently), and a layer with fewer than 64 inputs fails outright. Training needs
    the standard layout, so this turns the repacking off; a weight already repacked is converted
    back with bitsandbytes' own inverse (with a warning: the repacking rounded its block scales to
    bfloat16).

    Returns:
        The number of 4-bit layers seen.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    repacked = False
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
        state = getattr(layer.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            import bitsandbytes.functional as bnb_functional

            inverse = getattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse")  # noqa: B009  (no public API)
            layer.weight.data, layer.weight.quant_state = inverse(layer.weight.data, state)
            repacked = True
    if repacked:
        warnings.warn("some 4-bit weights had been repacked by an evaluation before the model was wrapped; "
                      "they are converted back, but the repacking rounded their block scales to bfloat16 "
                      "(relative error up to 2^-8): wrap the model before evaluating it, or load it again, "
                      "for the exact quantised weights", stacklevel=2)
    return len(layers)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The ``(d_out, d_in)`` weight of a quantised layer, dequantised (a new tensor).

    4-bit: in the layer's compute dtype (bitsandbytes' own dequantisation); 8-bit: ``CB * SCB / 127``
    in float32.
    """
    import bitsandbytes as bnb

    weight = module.weight
    if hasattr(weight, "quant_state"):  # Params4bit
        w = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        dtype = getattr(module, "compute_dtype", None) or w.dtype
        return w.to(dtype)
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = module.state.SCB  # Linear8bitLt moves the row scales to its state after the first forward
    return weight.data.float() * (scb.float()[:, None] / 127.0)


def dequantize_model_(model: nn.Module) -> torch.dtype:
    """Dequantises every bitsandbytes layer of a transformers model in place (transformers'
    ``model.dequantize``, which also drops ``config.quantization_config``), to the compute dtype:
    a 4-bit config's ``bnb_4bit_compute_dtype``, else the model's ``config.dtype``.

    Returns:
        The dtype of the dequantised weights.

    Raises:
        QuantizedMergeError: The model was not quantised through a transformers
            ``quantization_config`` (no ``hf_quantizer``), so there is no supported way back.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or not hasattr(model, "dequantize"):
        raise QuantizedMergeError(
            f"{type(model).__name__} holds bitsandbytes layers but was not loaded with a transformers "
            "quantization_config, so it cannot be dequantised: load the base model unquantised instead")
    qc = quantizer.quantization_config
    dtype = getattr(qc, "bnb_4bit_compute_dtype", None) if getattr(qc, "load_in_4bit", False) else None
    if dtype is None:
        dtype = getattr(model.config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model.dequantize(dtype=dtype)
    return dtype


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision name (``fp32``, ``bf16``, ``fp16``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed values: {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast(precision: str, device: torch.device | str = "cpu"):
    """The forward's mixed-precision context: ``torch.autocast`` for bf16 / fp16, nothing for fp32."""
    dtype = precision_dtype(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def upcast_trainable_(model: nn.Module) -> int:
    """Makes every trainable bf16 / fp16 parameter float32 in place (master weights: the optimizer
    state follows); returns how many were cast. The adapted layers' factors are float32 already;
    this catches ``modules_to_save`` heads loaded in the base's dtype."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
            cast += 1
    return cast


# Task heads trained in full (modules_to_save) must stay unquantised: a packed weight cannot train.
HEADS_KEPT_UNQUANTIZED = ("lm_head", "classifier", "score")


def bnb_config(quantize: str, compute_dtype: torch.dtype = torch.float32,
               skip_modules: tuple[str, ...] = HEADS_KEPT_UNQUANTIZED):
    """A transformers ``BitsAndBytesConfig`` for ``quantize``.

    Args:
        quantize: ``4bit`` (NF4 + double quantisation, QLoRA's recipe), ``nf4`` / ``fp4`` (that
            4-bit type, double quantisation on) or ``8bit`` (LLM.int8()).
        compute_dtype: dtype of the 4-bit layers' matmuls (the run's precision).
        skip_modules: Module names left unquantised (the task heads by default).
    """
    from transformers import BitsAndBytesConfig

    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize={quantize!r}; allowed values: {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4" if quantize == "fp4" else "nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=list(skip_modules))


__all__ = ["HEADS_KEPT_UNQUANTIZED", "PRECISIONS", "QUANTIZED_LAYER_TYPES", "QUANTIZE_CHOICES", "QuantizedMergeError", "autocast",
           "bnb_config", "dequantize_model_", "dequantized_weight", "is_quantized", "keep_trainable_4bit_layout_",
           "precision_dtype",
           "upcast_trainable_"]
