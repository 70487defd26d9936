"""PiSSA initialisation (``AdapterConfig.init="pissa"``) against peft's ``init_lora_weights="pissa"``.

The reference is peft itself: the same tiny model wrapped both ways must have the same factors,
residual base weights and outputs within 1e-5. A trained PiSSA model must give its outputs back
after save / load onto a fresh base, after merge, and from its peft export loaded onto the
*original* base model (peft's rank-2r PiSSA -> LoRA conversion).
"""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

import hyperadalora as ha  # noqa: E402
from tiny_models import bert_batch, tiny_bert, train_steps  # noqa: E402

TARGETS = ["query", "value", "dense"]
METHODS = ["lora", "dora"]


def config(method: str) -> ha.AdapterConfig:
    return ha.AdapterConfig(method=method, r=4, lora_alpha=8, target_modules=TARGETS, init="pissa", seed=0,
                            modules_to_save=("classifier",))


@torch.no_grad()
def logits(model, seed: int = 11) -> torch.Tensor:
    model.eval()
    batch = {k: v for k, v in bert_batch(seed).items() if k != "labels"}
    return model(**batch).logits


@pytest.mark.parametrize("method", METHODS)
def test_factors_residual_and_outputs_equal_peft(method):
    base = tiny_bert()
    ours = ha.wrap(copy.deepcopy(base), config(method))
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa", use_dora=method == "dora"))
    ref_layers = {n.removeprefix("base_model.model."): m for n, m in ref.named_modules() if hasattr(m, "lora_A")}
    assert set(ref_layers) == set(ours.adapted_layers)
    for name, layer in ours.adapted_layers.items():
        theirs = ref_layers[name]
        torch.testing.assert_close(layer.factors["A"], theirs.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.factors["B"], theirs.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.base_weight, theirs.base_layer.weight, rtol=1e-5, atol=1e-6)
        if method == "dora":
            torch.testing.assert_close(layer.magnitude, theirs.lora_magnitude_vector["default"].weight,
                                       rtol=1e-5, atol=1e-6)
    # At step 0 both compute the base model's outputs.
    torch.testing.assert_close(logits(ours), logits(ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(ours), logits(copy.deepcopy(base)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_trained_model_survives_save_load_merge_and_peft_export(method, tmp_path):
    base = tiny_bert()
    model = ha.wrap(copy.deepcopy(base), config(method))
    train_steps(model, 5)
    want = logits(model)
    assert (want - logits(copy.deepcopy(base))).abs().max() > 1e-4  # training changed the model

    model.save_adapter(tmp_path / "ours")
    torch.testing.assert_close(logits(ha.load_adapter(copy.deepcopy(base), tmp_path / "ours")), want)

    model.merge()
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-6)
    model.unmerge()
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-6)

    ha.export_peft_lora(model, tmp_path / "peft")
    exported = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))  # the ORIGINAL base
    assert {m.r["default"] for m in exported.modules() if hasattr(m, "lora_A") and "default" in m.r} == {8}
    torch.testing.assert_close(logits(exported), want, rtol=1e-5, atol=1e-5)


def test_load_corrects_the_base_when_the_saved_init_differs(tmp_path):
    """A fresh SVD that differs from the saved run's (another machine) still restores its residual."""
    base = tiny_bert()
    model = ha.wrap(copy.deepcopy(base), config("lora"))
    train_steps(model, 3)
    want = logits(model)
    model.save_adapter(tmp_path / "a")
    other = ha.wrap(copy.deepcopy(base), config("lora"))
    with torch.no_grad():
        for layer in other.adapted_layers.values():  # a different init, with its own consistent residual
            scale = layer.lora_alpha / layer.r
            w0 = layer.base_weight + scale * layer.pissa_b0 @ layer.pissa_a0
            layer.pissa_a0.mul_(1.1)
            layer.set_base_weight(w0 - scale * layer.pissa_b0 @ layer.pissa_a0)
    before = copy.deepcopy(other)
    for key, t in before.adapted_layers.items():
        t.factors["A"].data.copy_(model.adapted_layers[key].factors["A"])
        t.factors["B"].data.copy_(model.adapted_layers[key].factors["B"])
    before.model.classifier.load_state_dict(model.model.classifier.state_dict())
    assert (logits(before) - want).abs().max() > 1e-3  # the residual really differs without the correction
    other.load_adapter_weights(tmp_path / "a")
    torch.testing.assert_close(logits(other), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["adalora", "dylora"])
def test_methods_without_pissa_refuse_it(method):
    alloc = ha.AllocatorConfig(total_step=10) if method == "adalora" else None
    with pytest.raises(ValueError, match=r"init='pissa' is not supported by method=.*supporting it: lora, dora"):
        ha.AdapterConfig(method=method, init="pissa", allocator=alloc)
    with pytest.raises(ValueError, match="AdapterConfig.init='svd'"):
        ha.AdapterConfig(init="svd")
