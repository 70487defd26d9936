"""Numerical parity with peft 0.21: same factors in, same outputs and losses out.

For every (architecture, method) pair a peft model and one of ours are built from the same
base weights, our factors are copied from peft's, and both are trained for 30 AdamW steps on
the same batches. Losses must agree within 1e-5 (relative) at every step; for AdaLoRA the
allocator's masks and rank pattern must agree too.
"""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

import hyperadalora as ha  # noqa: E402
from tiny_models import (BERT_TARGETS, LLAMA_TARGETS, bert_batch, llama_batch, tiny_bert,  # noqa: E402
                         tiny_llama, train_beside_peft)

STEPS = 30
ADALORA_SCHEDULE = dict(total_step=STEPS, tinit=3, tfinal=6, deltaT=2)


def _arch(name):
    if name == "bert":
        return tiny_bert(), BERT_TARGETS, ["classifier"], bert_batch
    return tiny_llama(), LLAMA_TARGETS, [], llama_batch


def _peft_config(method, targets, save):
    # task_type matters: only the task-specific PeftModel forwards through AdaLoraModel.forward,
    # which is where peft adds the orthogonality regulariser.
    task = "SEQ_CLS" if save else "CAUSAL_LM"
    common = dict(target_modules=list(targets), modules_to_save=list(save) or None, lora_dropout=0.0, task_type=task)
    if method == "adalora":
        return peft.AdaLoraConfig(init_r=6, target_r=2, lora_alpha=8, orth_reg_weight=0.3,
                                  beta1=0.85, beta2=0.85, **ADALORA_SCHEDULE, **common)
    return peft.LoraConfig(r=4, lora_alpha=8, use_dora=(method == "dora"), **common)


def _our_config(method, targets, save):
    if method == "adalora":
        return ha.AdapterConfig(method="adalora", r=6, lora_alpha=8, gamma=0.3, target_modules=targets,
                                modules_to_save=save,
                                allocator=ha.AllocatorConfig(target_r=2, **ADALORA_SCHEDULE))
    return ha.AdapterConfig(method=method, r=4, lora_alpha=8, target_modules=targets, modules_to_save=save)


def _peft_module_name(peft_name: str) -> str:
    return peft_name.replace("base_model.model.", "", 1)


@torch.no_grad()
def _copy_factors(peft_model, ours, method, randomize: bool):
    """Copies peft's factors (made non-trivial first when ``randomize``) into our model."""
    g = torch.Generator().manual_seed(123)
    layers = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            layers[_peft_module_name(name)] = mod
    assert set(layers) == set(ours.adapted_layers), "peft and we must adapt the same modules"
    for name, mod in layers.items():
        layer = ours.adapted_layers[name]
        if method == "adalora":
            if randomize:
                mod.lora_E["default"].copy_(torch.randn(mod.lora_E["default"].shape, generator=g))
            layer.factors["P"].copy_(mod.lora_B["default"])
            layer.factors["lam"].copy_(mod.lora_E["default"][:, 0])
            layer.factors["Q"].copy_(mod.lora_A["default"])
        else:
            if randomize:
                w = mod.lora_B["default"].weight
                w.copy_(0.1 * torch.randn(w.shape, generator=g))
            layer.factors["A"].copy_(mod.lora_A["default"].weight)
            layer.factors["B"].copy_(mod.lora_B["default"].weight)
            if method == "dora":
                if randomize:  # peft sets m = ||W0 + sBA|| at init; re-derive it after changing B
                    mod.lora_magnitude_vector["default"].weight.mul_(
                        1 + 0.1 * torch.rand(mod.lora_magnitude_vector["default"].weight.shape, generator=g))
                layer.magnitude.copy_(mod.lora_magnitude_vector["default"].weight)
    # modules_to_save: peft trains a copy; start ours from the same values.
    for name, mod in peft_model.named_modules():
        if type(mod).__name__ == "ModulesToSaveWrapper":
            src = mod.modules_to_save["default"]
            dst = ours.model.get_submodule(_peft_module_name(name))
            for (pn, p), (qn, q) in zip(src.named_parameters(), dst.named_parameters()):
                q.copy_(p)


def _build(arch, method, randomize):
    base, targets, save, batch_fn = _arch(arch)
    peft_model = peft.get_peft_model(copy.deepcopy(base), _peft_config(method, targets, save))
    ours = ha.wrap(copy.deepcopy(base), _our_config(method, targets, save))
    _copy_factors(peft_model, ours, method, randomize)
    return peft_model, ours, batch_fn


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", ["lora", "adalora", "dora"])
def test_forward_matches_peft(arch, method):
    peft_model, ours, batch_fn = _build(arch, method, randomize=True)
    peft_model.eval()
    ours.eval()
    batch = batch_fn(7)
    with torch.no_grad():
        ref = peft_model(**batch)
        got = ours(**batch)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-6)
    # The forward really exercises the adapter: the base model alone gives something else.
    with torch.no_grad():
        for layer in ours.adapted_layers.values():
            layer.disabled = True
        base_logits = ours(**batch).logits
    assert (base_logits - ref.logits).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", ["lora", "adalora", "dora"])
def test_training_matches_peft(arch, method):
    peft_model, ours, batch_fn = _build(arch, method, randomize=False)
    losses_p, losses_o = train_beside_peft(peft_model, ours, STEPS, batch_fn, 5e-3, method == "adalora")
    torch.testing.assert_close(torch.tensor(losses_o), torch.tensor(losses_p), rtol=1e-5, atol=1e-7)
    assert losses_o[-1] < losses_o[0] - 1e-3, "training must actually change the loss"
    if method == "adalora":
        cfg = peft_model.peft_config["default"]
        peft_pattern = {_peft_module_name(k).replace(".lora_E.default", ""): v for k, v in cfg.rank_pattern.items()}
        assert peft_pattern == ours.allocator.rank_pattern
        kept = sum(sum(v) for v in peft_pattern.values())
        assert kept == 2 * len(ours.adapted_layers), "the final budget target_r * n must be reached"
        assert kept < 6 * len(ours.adapted_layers), "pruning must have happened"
        for name, layer in ours.adapted_layers.items():
            mod = peft_model.base_model.model.get_submodule(name)
            torch.testing.assert_close(layer.factors["lam"].detach(), mod.lora_E["default"][:, 0].detach(),
                                       rtol=1e-4, atol=1e-6)
            zero_peft = mod.lora_E["default"][:, 0] == 0
            assert torch.equal(zero_peft, ~torch.tensor(ours.allocator.rank_pattern[name]))
