"""Activation memory: the tensors autograd keeps per token for the backward pass.

Counted per token and per block for the frozen-base, low-rank-adapter case, from the tensors
the Hugging Face blocks and :func:`~hyperadalora.functional.lowrank_linear` save (checked with
``torch.autograd.graph.saved_tensors_hooks`` on MiniLM, MPNet and SmolLM2 blocks; the counts
match to the element). Korthikanti et al. (2022) count the same way for a fully trained GPT
block; here no frozen weight needs its input kept, so a linear's input is saved only for its
adapter (``x`` for ``dA``) or because a neighbouring op keeps it anyway, and every adapted
linear adds its ``N x r`` down-projection ``t`` (for ``dB``). ``e`` = bytes of the compute
dtype; statistics (norm ``rstd``, attention ``logsumexp``) are fp32.

* Llama block (RMSNorm, SDPA flash attention, SwiGLU, no dropout), all linears adapted:
  ``e (4h + 2 q_dim + 2 kv_dim + 4 ffn + sum r) + 4 (heads + 2)``: the two norm inputs and
  outputs, q, k, v after RoPE and the attention output (kept by the flash kernel, which also
  serves as o_proj's input), gate, up, silu(gate) and the SwiGLU product, one ``t`` per linear.
* BERT block (post-LayerNorm, GELU): ``e (8h + 2 ffn + sum r) + 4 * 4``: the block input, q, k, v,
  the attention output (the flash kernel's, or the unfused path's context), the two LayerNorm
  inputs and the first one's output, the GELU input and output; plus, with hidden dropout, two
  masks (``2h``, kept at ``e`` bytes on the CPU), and for attention with dropout (the unfused
  path) three ``heads x seq`` maps per token (softmax, mask, dropped probabilities); without it,
  the flash kernel's ``logsumexp``.
"""

from __future__ import annotations

from .adapters import AdapterCounts
from .shapes import ModelShape
from .setup import TrainSetup

FP32 = 4


def block_bytes_per_token(shape: ModelShape, rank_sum: float, seq: int, e: int) -> float:
    """Saved bytes per token of one block with every linear adapted (``rank_sum``: their summed ranks)."""
    h, f = shape.hidden, shape.intermediate
    if shape.family == "llama":
        return e * (4 * h + 2 * shape.q_dim + 2 * shape.kv_dim + 4 * f + rank_sum) + FP32 * (shape.heads + 2)
    saved = e * (8 * h + 2 * f + rank_sum) + FP32 * 4
    if shape.hidden_dropout > 0:
        saved += e * 2 * h
    if shape.attention_dropout > 0:
        saved += e * 3 * shape.heads * seq  # softmax, mask, dropped probabilities (heads x seq each)
    else:
        saved += FP32 * shape.heads  # flash logsumexp
    return saved


def block_transient_per_token(shape: ModelShape, seq: int, e: int) -> float:
    """Bytes per token alive at once in one block's backward on top of what it saved: the
    incoming and outgoing hidden gradients, the two MLP-wide gradients, and with the non-fused
    attention the two ``heads x seq`` gradient maps."""
    transient = e * (2 * shape.hidden + 2 * shape.intermediate)
    if shape.family == "bert" and shape.attention_dropout > 0:
        transient += e * 2 * shape.heads * seq
    return transient


def head_bytes_per_token(shape: ModelShape, e: int) -> tuple[float, float]:
    """(saved, transient) bytes per token of the LM head and loss.

    Causal LM (transformers' ``ForCausalLMLoss`` upcasts the logits to fp32): the fp32
    log-softmax output is kept for the backward, and the backward's first two nodes add the fp32
    gradient the loss hands it and the one it returns (``2 x 4 x vocab``); the logits themselves
    are freed with the model's output before the backward (10 bytes per vocab entry at most in
    the forward, less than the backward's 12). Plus the final norm's input. Classification heads
    read one token per sequence and are negligible.
    """
    if shape.task != "causal-lm":
        return 0.0, 0.0
    final_norm = e * shape.hidden + FP32 if shape.family == "llama" else 0.0
    return FP32 * shape.vocab + final_norm, 2 * FP32 * shape.vocab


def activation_terms(shape: ModelShape, counts: AdapterCounts, setup: TrainSetup) -> dict[str, float]:
    """Per-device activation bytes of one micro-batch: ``blocks``, ``head`` and ``transient``.

    With checkpointing only each block's input (``h`` per token) stays for all blocks, and one
    block's saved tensors exist again while its forward is recomputed in the backward.
    """
    e, seq = setup.act_bytes, setup.seq_len
    tokens = setup.micro * seq
    rank_sum = counts.rank_sum / shape.layers
    per_block = block_bytes_per_token(shape, rank_sum, seq, e)
    if setup.checkpointing:
        blocks = tokens * (shape.layers * e * shape.hidden + per_block)
    else:
        blocks = tokens * shape.layers * per_block
    extra = 0.0
    if shape.relative_buckets:
        extra = tokens * FP32 * shape.heads * seq  # MPNet's relative position bias, alive through the forward
    head_saved, head_transient = head_bytes_per_token(shape, e)
    # The backward's peak: the loss gradients at its start, or one block's working set later on.
    transient = max(head_transient, block_transient_per_token(shape, seq, e))
    return {"blocks": blocks, "head": tokens * head_saved, "transient": tokens * transient + extra}
