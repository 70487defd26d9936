"""bf16 training (bf16 base, float32 master weights, bf16 autocast) against float32 training.

Tolerances (stated in docs/scale.md): over 50 AdamW steps on a tiny BERT the bf16 loss stays within
1e-2 (absolute) of the fp32 loss at every step, and the trained update (final - initial trainable
parameters) within 10% (relative L2) of fp32's (15% for the hyper source, whose hypernetwork
weights are most of the update). Both runs start from the same float32 values.
"""

from __future__ import annotations

import pytest
import torch

import hyperadalora as ha
from hyperadalora.functional import lowrank_linear
from hyperadalora.quant import autocast, upcast_trainable_
from hyperadalora.train.step import optimizer_step
from tiny_models import BERT_TARGETS, bert_batch, tiny_bert

STEPS = 50


def build(precision: str, source: str, method: str) -> ha.AdaptedModel:
    base = tiny_bert()
    if precision == "bf16":
        base = base.to(torch.bfloat16)
    alloc = ha.AllocatorConfig(target_r=2, total_step=STEPS, tinit=5, tfinal=10, deltaT=2) if method == "adalora" else None
    cfg = ha.AdapterConfig(method=method, r=4, lora_alpha=8, target_modules=BERT_TARGETS, modules_to_save=["classifier"],
                           seed=0, source=source, allocator=alloc)
    model = ha.wrap(base, cfg)
    upcast_trainable_(model)
    return model.train()


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(model, precision: str, lr: float) -> torch.Tensor:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return torch.tensor([optimizer_step(model, opt, [bert_batch(s % 5)], step_index=s, max_grad_norm=1.0,
                                        precision=precision).loss for s in range(STEPS)])


@pytest.mark.parametrize("source,method,lr,tol", [("direct", "lora", 1e-3, 0.1), ("direct", "adalora", 1e-3, 0.1),
                                                  ("direct", "dora", 1e-3, 0.1), ("hyper", "lora", 5e-4, 0.15)])
def test_bf16_training_tracks_fp32(source, method, lr, tol):
    ref, low = build("fp32", source, method), build("bf16", source, method)
    assert all(p.dtype == torch.float32 for p in trainable(low).values()), "master weights must be float32"
    assert low.model.bert.encoder.layer[0].attention.self.query.base_layer.weight.dtype == torch.bfloat16
    with torch.no_grad():  # same float32 start (inits drawn in bf16 would round differently)
        low.load_state_dict({k: v for k, v in ref.state_dict().items() if "base_layer" not in k}, strict=False)
    init = trainable(ref)
    loss_ref, loss_low = train(ref, "fp32", lr), train(low, "bf16", lr)
    assert loss_ref[0] - loss_ref[-1] > 0.03, "the runs must really train"
    assert (loss_low - loss_ref).abs().max() < 1e-2
    end_ref, end_low = trainable(ref), trainable(low)
    upd_ref = torch.cat([(end_ref[n] - init[n]).flatten() for n in init])
    upd_low = torch.cat([(end_low[n] - init[n]).flatten() for n in init])
    assert (upd_low - upd_ref).norm() / upd_ref.norm() < tol


def test_fused_path_under_autocast_matches_an_explicit_bf16_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.bfloat16)
    w = torch.randn(8, 16, generator=g, dtype=torch.bfloat16)
    a = torch.randn(3, 16, generator=g).requires_grad_()
    b = torch.randn(8, 3, generator=g).requires_grad_()
    with autocast("bf16"):
        y = lowrank_linear(x, w, None, a, b, 0.5)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and a.grad.dtype == b.grad.dtype == torch.float32
    ref = (x.float() @ w.float().t() + 0.5 * (x.float() @ a.detach().t()) @ b.detach().t())
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)
    # fp32 weights under autocast (a float32 base with precision=bf16 in the Python API) work too.
    with autocast("bf16"):
        y32 = lowrank_linear(x.float(), w.float(), None, a, b, 0.5)
    assert y32.dtype == torch.bfloat16


def test_hyper_generated_factors_keep_the_update_under_bf16():
    model = build("fp32", "hyper", "lora")
    source = model.source
    with torch.no_grad():  # a trained-looking hypernetwork: a visible but small update on a big anchor
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))
    key = next(iter(source.groups))
    with torch.no_grad():
        exact = source.generate_group(key) - source.anchor(key)
        with autocast("bf16"):
            generated = source.generate_group(key)
    assert generated.dtype == torch.float32, "generated factors stay float32 (anchor + update)"
    delta = generated - source.anchor(key)
    assert exact.abs().max() > 0
    # The update survives with bf16 matmul accuracy; rounding F itself to bf16 would not keep it.
    assert (delta - exact).norm() / exact.norm() < 3e-2
