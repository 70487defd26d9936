"""A causal-LM loss that never holds the whole ``(tokens, vocabulary)`` logits (issue 23).

A causal LM's forward projects every position onto the vocabulary and takes the cross-entropy of
those logits: at SmolLM2's 49,152-token vocabulary, batch 4 x 512, the fp32 logits alone are
384 MiB, and their upcast copy, the log-softmax and the logits' gradient are as large again each,
which is most of what a 4-bit, checkpointed run still holds. Here the decoder runs as usual, then
the output projection and the cross-entropy run ``chunk_tokens`` positions at a time, each chunk
under activation checkpointing: its logits are freed after its loss is summed and recomputed in
the backward, so one chunk's logits live at a time (the idea of Liger's fused linear cross-entropy
and of cut cross-entropy, in plain torch so it runs on any device). The loss and the gradients
equal the model's own (mean over the non-ignored shifted labels, as transformers'
``ForCausalLMLoss``), up to the order of float sums.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
#: Model-config fields that change the logits after the output projection; the chunked path would
#: skip them, so such models are refused rather than given a different loss.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def check_chunkable(model: nn.Module) -> None:
    """Raises a ``ValueError`` naming the fix when ``model`` is not a causal LM whose loss can be chunked.

    Args:
        model: The Hugging Face model (``...ForCausalLM``), not the adapted wrapper.
    """
    name = type(model).__name__
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if not name.endswith("ForCausalLM") or not isinstance(head, nn.Linear) or not hasattr(model, "get_decoder"):
        raise ValueError(f"loss_chunk_tokens > 0 needs a causal language model (a ...ForCausalLM with a linear "
                         f"output layer), got {name}: set loss_chunk_tokens=0 for this model")
    config = getattr(model, "config", None)
    changed = [f for f in _LOGIT_TRANSFORMS if getattr(config, f, None) not in (None, 1, 1.0)]
    if changed:
        raise ValueError(f"{name} transforms its logits ({', '.join(changed)}), which the chunked loss does not "
                         "reproduce: set loss_chunk_tokens=0 for this model")


def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk (the logits exist only inside this call)."""
    logits = head(hidden).float()  # (chunk, hidden) -> (chunk, vocab), upcast as transformers does
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` against ``labels``, ``chunk_tokens`` positions at a time.

    Args:
        head: The output projection (``model.get_output_embeddings()``).
        hidden: The decoder's last hidden states, ``(batch, seq, hidden)``.
        labels: ``(batch, seq)`` token ids, ``-100`` where no loss is taken (not yet shifted).
        chunk_tokens: Positions per chunk (> 0).

    Returns:
        The scalar loss; ``nan`` when no label is counted (as ``F.cross_entropy``'s mean).
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # position t predicts token t + 1
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (batch * seq, hidden)
    flat_labels = shifted.reshape(-1).to(hidden.device)  # (batch * seq,)
    counted = flat_labels != IGNORE_INDEX  # (batch * seq,)
    # One host sync for every chunk's "has a label" (a chunk of padding costs no projection).
    chunks = -(-counted.numel() // chunk_tokens)
    padded = F.pad(counted, (0, chunks * chunk_tokens - counted.numel()))  # (chunks * chunk_tokens,)
    with_labels = padded.view(chunks, chunk_tokens).any(dim=1).tolist()
    total = hidden.new_zeros((), dtype=torch.float32)
    for index in (i for i, has in enumerate(with_labels) if has):
        part = slice(index * chunk_tokens, (index + 1) * chunk_tokens)
        total = total + checkpoint(_chunk_loss_sum, head, flat_hidden[part], flat_labels[part], use_reentrant=False)
    return total / counted.sum()


def chunked_causal_lm_forward(model: nn.Module, chunk_tokens: int, **batch: Any) -> Any:
    """``model(**batch)`` of a causal LM with the loss of :func:`chunked_lm_loss` and no logits.

    Args:
        model: A model :func:`check_chunkable` accepts.
        chunk_tokens: Positions per chunk.
        **batch: The forward's keyword arguments, with ``labels``.

    Returns:
        A ``CausalLMOutputWithPast`` whose ``logits`` is ``None``.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    labels = batch.pop("labels")
    batch.setdefault("use_cache", False)  # training: a key/value cache would only hold memory
    outputs = model.get_decoder()(**batch)
    loss = chunked_lm_loss(model.get_output_embeddings(), outputs.last_hidden_state, labels, chunk_tokens)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)
