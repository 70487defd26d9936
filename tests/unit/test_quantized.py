"""Adapters over bitsandbytes 4-bit / 8-bit bases (QLoRA), against peft on the same quantised base.

The tiny Llama is built in float32, saved, and reloaded with a ``BitsAndBytesConfig`` on the
CPU (bitsandbytes 0.50 quantises and back-propagates there). peft and we start from the same
factors; losses must agree within 1e-4 (relative) for 10 AdamW steps.
"""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

import hyperadalora as ha  # noqa: E402
from hyperadalora.quant import (  # noqa: E402
    QuantizedMergeError,
    bnb_config,
    dequantized_weight,
    is_quantized,
    keep_trainable_4bit_layout_,
)
from tiny_models import LLAMA_TARGETS, llama_batch, tiny_llama, train_beside_peft  # noqa: E402

STEPS = 10
SCHEDULE = dict(total_step=STEPS, tinit=2, tfinal=3, deltaT=2)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(folder)
    return folder


def quantized_llama(folder, quantize: str = "4bit"):
    from transformers import LlamaForCausalLM, logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = LlamaForCausalLM.from_pretrained(folder, quantization_config=bnb_config(quantize), device_map="cpu")
    keep_trainable_4bit_layout_(model)  # peft's references too: bitsandbytes' CPU repacking fails on tiny layers
    return model


def peft_config(method):
    common = dict(target_modules=list(LLAMA_TARGETS), lora_dropout=0.0, task_type="CAUSAL_LM")
    if method == "adalora":
        return peft.AdaLoraConfig(init_r=6, target_r=2, lora_alpha=8, orth_reg_weight=0.3, beta1=0.85, beta2=0.85,
                                  **SCHEDULE, **common)
    return peft.LoraConfig(r=4, lora_alpha=8, **common)


def our_config(method):
    if method == "adalora":
        return ha.AdapterConfig(method="adalora", r=6, lora_alpha=8, gamma=0.3, target_modules=LLAMA_TARGETS,
                                allocator=ha.AllocatorConfig(target_r=2, **SCHEDULE))
    return ha.AdapterConfig(method=method, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)


@torch.no_grad()
def copy_peft_factors(peft_model, ours, method):
    g = torch.Generator().manual_seed(5)
    for name, layer in ours.adapted_layers.items():
        mod = peft_model.base_model.model.get_submodule(name)
        if method == "adalora":
            layer.factors["P"].copy_(mod.lora_B["default"])
            layer.factors["lam"].copy_(mod.lora_E["default"][:, 0])
            layer.factors["Q"].copy_(mod.lora_A["default"])
        else:
            mod.lora_B["default"].weight.copy_(0.1 * torch.randn(mod.lora_B["default"].weight.shape, generator=g))
            layer.factors["A"].copy_(mod.lora_A["default"].weight)
            layer.factors["B"].copy_(mod.lora_B["default"].weight)


@pytest.mark.parametrize("method,quantize", [("lora", "4bit"), ("lora", "fp4"), ("adalora", "4bit"),
                                             ("lora", "8bit")])
def test_training_on_quantized_base_matches_peft(saved_llama, method, quantize):
    peft_model = peft.get_peft_model(quantized_llama(saved_llama, quantize), peft_config(method))
    ours = ha.wrap(quantized_llama(saved_llama, quantize), our_config(method))
    assert all(layer.quantized for layer in ours.adapted_layers.values())
    copy_peft_factors(peft_model, ours, method)
    losses_p, losses_o = train_beside_peft(peft_model, ours, STEPS, llama_batch, 5e-3, method == "adalora", repeat=3)
    torch.testing.assert_close(torch.tensor(losses_o), torch.tensor(losses_p), rtol=1e-4, atol=1e-6)
    assert losses_o[-1] < losses_o[0] - 1e-3, "training must actually change the loss"
    if method == "adalora":
        cfg = peft_model.peft_config["default"]
        pattern = {k.replace("base_model.model.", "", 1).replace(".lora_E.default", ""): v
                   for k, v in cfg.rank_pattern.items()}
        assert pattern == ours.allocator.rank_pattern


def test_dequantized_weight_is_what_the_layer_computes(saved_llama):
    model = quantized_llama(saved_llama, "4bit")
    layer = model.model.layers[0].mlp.up_proj
    assert is_quantized(layer) and not is_quantized(torch.nn.Linear(2, 2))
    x = torch.randn(5, layer.in_features)
    torch.testing.assert_close(x @ dequantized_weight(layer).t(), layer(x), rtol=1e-5, atol=1e-5)
    # ... and 4-bit rounding is real: the dequantised weight is not the float32 original.
    original = tiny_llama().model.layers[0].mlp.up_proj.weight
    err = (dequantized_weight(layer) - original).abs().max()
    assert 1e-3 < err < 0.5 * original.abs().max()


def test_dora_on_quantized_base_uses_dequantized_norms(saved_llama):
    model = ha.wrap(quantized_llama(saved_llama), ha.AdapterConfig(method="dora", r=4, target_modules=["q_proj"]))
    layer = next(iter(model.adapted_layers.values()))
    w0 = dequantized_weight(layer.base_layer)
    torch.testing.assert_close(layer.magnitude.detach(), torch.linalg.norm(w0, dim=1))
    with torch.no_grad():
        layer.factors["B"].normal_(0, 0.1)
    x = torch.randn(2, 3, layer.in_features)
    a, b = layer.factors["A"], layer.factors["B"]
    s = layer.method.scaling(layer)
    w = w0 + s * b @ a
    expected = (x @ w.t()) * (layer.magnitude / torch.linalg.norm(w, dim=1))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_on_quantized_base_is_refused(saved_llama):
    model = ha.wrap(quantized_llama(saved_llama), ha.AdapterConfig(method="lora", r=4, target_modules=["q_proj"]))
    with pytest.raises(QuantizedMergeError, match="quantised base weight of Linear4bit"):
        model.merge()
    with pytest.raises(QuantizedMergeError, match="PiSSA"):
        ha.wrap(quantized_llama(saved_llama), ha.AdapterConfig(method="lora", r=4, target_modules=["q_proj"],
                                                               init="pissa"))


def test_peft_export_loads_on_the_same_quantized_base(saved_llama, tmp_path):
    model = ha.wrap(quantized_llama(saved_llama), our_config("lora"))
    with torch.no_grad():
        for layer in model.adapted_layers.values():
            layer.factors["B"].normal_(0, 0.1)
    model.eval()
    batch = llama_batch(1)
    with torch.no_grad():
        ours = model(**batch).logits
    ha.export_peft_lora(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(quantized_llama(saved_llama), tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = loaded(**batch).logits
        base = quantized_llama(saved_llama)(**batch).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3


def test_a_quantised_head_cannot_be_trained_and_task_heads_stay_unquantised(tmp_path):
    from transformers import BertForSequenceClassification

    from tiny_models import BERT_TARGETS, tiny_bert

    tiny_bert().save_pretrained(tmp_path)
    model = BertForSequenceClassification.from_pretrained(tmp_path, quantization_config=bnb_config("4bit"),
                                                          device_map="cpu")
    assert not is_quantized(model.classifier) and is_quantized(model.bert.encoder.layer[0].attention.self.query)
    cfg = ha.AdapterConfig(method="lora", r=4, target_modules=BERT_TARGETS, modules_to_save=["classifier"])
    assert ha.wrap(model, cfg).model.classifier.weight.requires_grad
    quantised_head = BertForSequenceClassification.from_pretrained(
        tmp_path, quantization_config=bnb_config("4bit", skip_modules=()), device_map="cpu")
    with pytest.raises(ValueError, match="modules_to_save entry 'classifier' is quantised"):
        ha.wrap(quantised_head, cfg)


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_load_model_releases_the_checkpoint_map_of_a_quantised_base(tmp_path):
    """transformers leaves a quantised model's float weights aliasing the checkpoint's memory map (every
    touched page stays resident); load_model copies them out so that the map is released. The
    reference is the kernel's own list of this process's mappings, with and without the copy."""
    import gc

    from hyperadalora.models import load_model
    from test_train_loop import tiny_llama_dir

    folder = tiny_llama_dir(tmp_path)  # with a tokenizer, as load_model needs
    checkpoint = str(folder / "model.safetensors")
    plain = quantized_llama(folder)  # transformers alone
    gc.collect()
    assert checkpoint in open("/proc/self/maps").read()
    del plain
    gc.collect()
    model, _ = load_model(str(folder), task="causal-lm", quantize="4bit")
    gc.collect()
    assert checkpoint not in open("/proc/self/maps").read()
    assert any(is_quantized(m) for m in model.modules())


def _quantized_linear(seed: int = 0):
    """A 4-bit layer large enough for bitsandbytes' CPU repacking (128 inputs, 64 outputs)."""
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    weight = torch.nn.Linear(128, 64, bias=False).weight.data
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    return layer.to("cpu")  # quantises


def _evaluate_then_train(layer, x):
    """(dequantised weight, output, input gradient) of a training forward after one evaluation."""
    layer.eval()
    with torch.no_grad():
        layer(x)  # where bitsandbytes would repack the weight
    layer.train()
    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.sum().backward()
    return dequantized_weight(layer), y.detach(), xg.grad


def test_an_evaluation_leaves_a_4bit_layer_trainable():
    """On an AVX512-BF16 CPU, bitsandbytes repacks a 4-bit weight at its first evaluation, after which
    dequantisation is scrambled and no gradient reaches the layer's input (seen on this machine's AMD
    EPYC); elsewhere the repacking never happens and this holds trivially."""
    x = torch.randn(3, 128)
    reference = _quantized_linear()
    w0 = dequantized_weight(reference)
    xg = x.clone().requires_grad_()
    y0 = reference(xg)
    y0.sum().backward()
    layer = _quantized_linear()
    assert keep_trainable_4bit_layout_(torch.nn.Sequential(layer)) == 1
    w, y, grad = _evaluate_then_train(layer, x)
    torch.testing.assert_close(w, w0, rtol=0, atol=0)
    torch.testing.assert_close(y, y0.detach(), rtol=1e-6, atol=1e-6)
    assert grad is not None
    torch.testing.assert_close(grad, xg.grad, rtol=1e-6, atol=1e-6)


def test_wrap_keeps_the_trainable_layout(saved_llama):
    from transformers import LlamaForCausalLM

    raw = LlamaForCausalLM.from_pretrained(saved_llama, quantization_config=bnb_config("4bit"), device_map="cpu")
    model = ha.wrap(raw, our_config("lora"))
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)


def test_a_weight_already_repacked_is_converted_back():
    x = torch.randn(3, 128)
    w0 = dequantized_weight(_quantized_linear())
    layer = _quantized_linear()
    layer.eval()
    with torch.no_grad():
        layer(x)  # repacked here on an AVX512-BF16 CPU
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    with pytest.warns(UserWarning, match="rounded their block scales to bfloat16"):
        keep_trainable_4bit_layout_(layer)
    w, _, grad = _evaluate_then_train(layer, x)
    bf16_rounding = 2.0**-8  # of each block's scale, hence of each weight
    torch.testing.assert_close(w, w0, rtol=bf16_rounding, atol=0)
    assert grad is not None  # d(sum y)/dx = 1^T W of the restored weight
    torch.testing.assert_close(grad, torch.ones(3, 64) @ w, rtol=1e-5, atol=1e-5)
