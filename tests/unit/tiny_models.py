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


def train_beside_peft(peft_model, ours, steps: int, batch_fn, lr: float, adalora: bool, repeat: int = 5
                      ) -> tuple[list[float], list[float]]:
    """Trains a peft model and ours side by side on the same batches (AdamW, ``lr``); returns
    ``(peft_losses, our_losses)``. ``adalora``: both allocators run after every step."""
    opt_p = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=lr)
    assert sum(p.numel() for g in opt_p.param_groups for p in g["params"]) == \
        sum(p.numel() for g in opt_o.param_groups for p in g["params"])
    peft_model.train()
    ours.train()
    losses_p, losses_o = [], []
    for step in range(steps):
        batch = batch_fn(step % repeat)  # a few repeated batches so the loss really moves
        out_p, out_o = peft_model(**batch), ours(**batch)
        out_p.loss.backward()
        out_o.loss.backward()
        opt_p.step()
        opt_o.step()
        if adalora:
            peft_model.base_model.update_and_allocate(step)
            ours.after_step(step)
        opt_p.zero_grad()
        opt_o.zero_grad()
        losses_p.append(out_p.loss.item())
        losses_o.append(out_o.loss.item())
    return losses_p, losses_o
