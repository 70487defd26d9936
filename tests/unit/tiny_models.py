"""Tiny random transformers built from configs (no downloads), shared by the unit tests."""

from __future__ import annotations

import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

BERT_TARGETS = ["query", "key", "value", "dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # GPT-2's Conv1D layers (weights stored in x out)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    """A 2-layer BERT classifier with no dropout, so train-mode runs are deterministic."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=40, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (``Conv1D`` projections, fused ``c_attn``) with no dropout."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def bert_batch(seed: int, batch: int = 4, seq: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 120, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch,), generator=g)}


def llama_batch(seed: int, batch: int = 3, seq: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train_steps(model, steps: int, batch_fn=bert_batch, lr: float = 3e-3, start: int = 0) -> list[float]:
    """AdamW steps on repeated batches with the full training contract; returns the losses.

    A fresh optimizer each call, so two models in the same state continue identically.
    """
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(start, start + steps):
        out = model(**batch_fn(step % 3))
        out.loss.backward()
        opt.step()
        model.after_step(step)
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses


def contract_step(model, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer, step: int,
                  forward=None) -> torch.Tensor:
    """One optimizer step with the full training contract; returns the (detached) loss.

    ``forward`` is what runs the batch (a ``DistributedDataParallel`` around ``model``), default
    ``model`` itself; ``backward_hypernetworks`` is a no-op unless ``generate="per_step"``.
    """
    loss = (forward or model)(**batch).loss
    loss.backward()
    model.backward_hypernetworks()
    opt.step()
    model.after_step(step)
    opt.zero_grad(set_to_none=True)
    return loss.detach()
