"""Activation checkpointing of the base model (transformers, non-reentrant) changes no gradient.

For every method x source, two identical adapted tiny Llamas (adapter dropout on, so the
recomputation must replay the same dropout masks) train 3 steps, one with transformers'
``activation_checkpointing_enable`` (what ``gradient_checkpointing=true`` calls); every gradient must agree
within 1e-6 at every step. The
recomputation really happens (adapted layers run again in the backward), DyLoRA's sampled rank
is the same in it (the gradients would differ otherwise), and the hyper source calls its
hypernetworks once per step, not once per recomputation.
"""

from __future__ import annotations

import pytest
import torch

import hyperadalora as ha
from hyperadalora.methods import METHOD_REGISTRY
from hyperadalora.train.build import enable_activation_checkpointing
from tiny_models import LLAMA_TARGETS, llama_batch, tiny_llama

STEPS = 3


def build(method: str, source: str, checkpointing: bool):
    alloc = {"allocator": ha.AllocatorConfig(total_step=STEPS, target_r=2, tinit=0, tfinal=1, deltaT=1)} \
        if method == "adalora" else {}
    cfg = ha.AdapterConfig(method=method, source=source, r=4, lora_alpha=8.0, lora_dropout=0.1, seed=3,
                           target_modules=LLAMA_TARGETS, hyper=ha.HyperConfig(hidden=24, layers=1), **alloc)
    model = ha.wrap(tiny_llama(), cfg)
    if checkpointing:
        enable_activation_checkpointing(model.model)
    return model.train()


def count_calls(modules) -> list[int]:
    counter = [0]
    for m in modules:
        m.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return counter


@pytest.mark.parametrize("source", ["direct", "hyper"])
@pytest.mark.parametrize("method", list(METHOD_REGISTRY))
def test_checkpointing_gives_the_same_gradients(method, source):
    plain, ckpt = build(method, source, False), build(method, source, True)
    assert ckpt.model.is_activation_checkpointing and not plain.model.is_activation_checkpointing
    layer_calls = [count_calls(m.adapted_layers.values()) for m in (plain, ckpt)]
    nets = [list(getattr(m.source, "nets", {}).values()) for m in (plain, ckpt)]
    net_calls = [count_calls(n) for n in nets]
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (plain, ckpt)]
    for step in range(STEPS):
        torch.manual_seed(100 + step)  # the same dropout masks for both
        plain(**llama_batch(step)).loss.backward()
        torch.manual_seed(100 + step)
        ckpt(**llama_batch(step)).loss.backward()
        grads = []
        for m in (plain, ckpt):
            m.backward_hypernetworks()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name, g in grads[0].items():
            torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-6, msg=f"{name} at step {step}")
        for m, opt in zip((plain, ckpt), opts):
            opt.step()
            m.after_step(step)
            opt.zero_grad()
    n_layers = len(plain.adapted_layers)
    assert layer_calls[0][0] == STEPS * n_layers
    # Recomputed (torch's non-reentrant checkpoint stops once the last needed activation is back,
    # so a decoder layer's final projection may not run again).
    assert layer_calls[1][0] >= STEPS * n_layers + STEPS * n_layers // 2, "checkpointing must recompute"
    assert net_calls[1][0] == net_calls[0][0], "the hypernetworks run once per step, not per recomputation"
    if source == "hyper":
        assert 0 < net_calls[0][0] <= STEPS * len(plain.source.groups)


def test_run_config_turns_on_checkpointing_and_master_weights():
    from hyperadalora.train import RunConfig, build_model

    config = RunConfig(task="alpaca", model="tiny", steps=2, precision="bf16", gradient_checkpointing=True,
                       adapter={"method": "lora", "r": 4, "target_modules": LLAMA_TARGETS})
    model, _, _ = build_model(config, base_model=tiny_llama().to(torch.bfloat16), tokenizer=None)
    assert model.model.is_activation_checkpointing
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    with pytest.raises(ValueError, match="precision"):
        RunConfig(precision="fp8")
    with pytest.raises(ValueError, match="quantize"):
        RunConfig(quantize="3bit")
