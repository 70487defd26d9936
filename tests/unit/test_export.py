"""``export_peft_lora``: every method and source loads in peft and gives our eval outputs.

Each case wraps a tiny model, trains a few steps with the full training contract, exports,
loads the adapter onto a fresh copy of the base model with ``peft.PeftModel.from_pretrained``
and compares eval logits (and those of ``merge_and_unload()``) with ours within 1e-5 relative.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

peft = pytest.importorskip("peft")

import hyperadalora as ha  # noqa: E402
from hyperadalora.export import export_peft_lora  # noqa: E402
from hyperadalora.methods import METHOD_REGISTRY  # noqa: E402
from tiny_models import (BERT_TARGETS, GPT2_TARGETS, LLAMA_TARGETS, bert_batch, llama_batch,  # noqa: E402
                         tiny_bert, tiny_gpt2, tiny_llama, train_steps)

STEPS = 12
METHODS = list(METHOD_REGISTRY)
SOURCES = ["direct", "hyper"]
ALLOC = dict(total_step=STEPS, target_r=2, tinit=2, tfinal=4, deltaT=2)
HYPER = ha.HyperConfig(hidden=24, layers=1)


ARCHS = {
    "bert": (tiny_bert, BERT_TARGETS, ("classifier",), bert_batch),
    "llama": (tiny_llama, LLAMA_TARGETS, (), llama_batch),
    "gpt2": (tiny_gpt2, GPT2_TARGETS, (), llama_batch),
}


def config(method, source, targets, save, **alloc):
    kw = dict(r=4, lora_alpha=8)
    if method == "adalora":
        kw = dict(r=6, lora_alpha=8, allocator=ha.AllocatorConfig(**{**ALLOC, **alloc}))
    return ha.AdapterConfig(method=method, source=source, seed=7, target_modules=targets, modules_to_save=save,
                            hyper=HYPER, **kw)


def trained(arch, method, source, steps=STEPS, **alloc):
    make, targets, save, batch_fn = ARCHS[arch]
    base = make()
    model = ha.wrap(copy.deepcopy(base), config(method, source, targets, save, **alloc))
    train_steps(model, steps, batch_fn)
    return base, model, batch_fn


@torch.no_grad()
def logits(model, batch):
    model.eval()
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out


def check_peft_matches(base, model, batch_fn, directory):
    """Exports, loads in peft, compares eval and merged outputs; returns (config dict, peft model)."""
    path = export_peft_lora(model, directory)
    assert path == directory
    batch = {k: v for k, v in batch_fn(11).items() if k != "labels"}
    ours = logits(model, batch)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory))
    assert not any("lora_dropout" in n and isinstance(m, nn.Dropout) for n, m in peft_model.named_modules())
    got = logits(peft_model, batch)
    torch.testing.assert_close(got, ours, rtol=1e-5, atol=1e-6)
    # The adapter (or the trained head) really changes the outputs.
    assert (logits(copy.deepcopy(base), batch) - ours).abs().max() > 1e-4
    cfg = json.loads((directory / "adapter_config.json").read_text())
    merged = copy.deepcopy(peft_model).merge_and_unload()
    torch.testing.assert_close(logits(merged, batch), ours, rtol=1e-5, atol=1e-6)
    return cfg, peft_model


def peft_ranks(peft_model) -> dict[str, int]:
    inner = peft_model.base_model.model
    return {n: m.r["default"] for n, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("method", METHODS)
def test_bert_every_method_and_source(method, source, tmp_path):
    base, model, batch_fn = trained("bert", method, source)
    cfg, peft_model = check_peft_matches(base, model, batch_fn, tmp_path / "peft")
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS" and cfg["bias"] == "none"
    assert cfg["lora_dropout"] == 0.0 and cfg["use_dora"] == (method == "dora") and not cfg["fan_in_fan_out"]
    assert cfg["modules_to_save"] == ["classifier"]
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.classifier.weight" in tensors
    torch.testing.assert_close(tensors["base_model.model.classifier.weight"], model.model.classifier.weight.detach())
    kept = {n: k for n, k in model.ranks.items() if k > 0}
    assert sorted(cfg["target_modules"]) == sorted(kept)
    assert peft_ranks(peft_model) == kept
    name = next(iter(kept))
    assert f"base_model.model.{name}.lora_A.weight" in tensors
    assert (f"base_model.model.{name}.lora_magnitude_vector" in tensors) == (method == "dora")
    if method == "adalora":
        assert cfg["rank_pattern"] == kept
        assert sum(model.ranks.values()) == 2 * len(model.adapted_layers) < 6 * len(model.adapted_layers)
        assert len(set(model.ranks.values())) > 1, "the allocator must have made ranks differ"
        scale = 8 / (6 + 1e-5)
        for n, k in kept.items():
            assert cfg["alpha_pattern"][n] / k == pytest.approx(scale, rel=1e-12)
    else:
        assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {} and cfg["r"] == 4 and cfg["lora_alpha"] == 8


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_llama(method, source, tmp_path):
    base, model, batch_fn = trained("llama", method, source)
    cfg, peft_model = check_peft_matches(base, model, batch_fn, tmp_path / "peft")
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["modules_to_save"] is None
    assert peft_ranks(peft_model) == {n: k for n, k in model.ranks.items() if k > 0}
    if method == "adalora":
        assert cfg["rank_pattern"] == {n: k for n, k in model.ranks.items() if k > 0}


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_gpt2_conv1d_fan_in_fan_out(method, tmp_path):
    base, model, batch_fn = trained("gpt2", method, "direct")
    cfg, _ = check_peft_matches(base, model, batch_fn, tmp_path / "peft")
    assert cfg["fan_in_fan_out"] is True and cfg["task_type"] == "CAUSAL_LM"


@pytest.mark.parametrize("source", SOURCES)
def test_zero_rank_module_is_left_out(source, tmp_path):
    base, model, batch_fn = trained("bert", "adalora", source)
    name = next(n for n, k in model.ranks.items() if k > 0)
    layer = model.adapted_layers[name]
    with torch.no_grad():
        layer.rank_mask.zero_()
        if source == "direct":
            layer.factors["lam"].zero_()  # what the peft-style allocator does to a pruned value
    assert model.ranks[name] == 0
    cfg, peft_model = check_peft_matches(base, model, batch_fn, tmp_path / "peft")
    assert name not in cfg["target_modules"] and name not in cfg["rank_pattern"]
    assert name not in peft_ranks(peft_model)


@pytest.mark.parametrize("source", SOURCES)
def test_nothing_kept_exports_a_loadable_no_op(source, tmp_path):
    base, model, batch_fn = trained("bert", "adalora", source)
    with torch.no_grad():
        for layer in model.adapted_layers.values():
            layer.rank_mask.zero_()
            if source == "direct":
                layer.factors["lam"].zero_()
    cfg, peft_model = check_peft_matches(base, model, batch_fn, tmp_path / "peft")  # the trained head still counts
    assert cfg["rank_pattern"] == {n: 1 for n in model.adapted_layers}
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert all(t.abs().max() == 0 for k, t in tensors.items() if k.endswith("lora_B.weight"))


def test_pruned_but_nonzero_lam_warns(tmp_path):
    _, model, _ = trained("bert", "adalora", "direct")
    layer = next(iter(model.adapted_layers.values()))
    with torch.no_grad():
        layer.rank_mask[0] = 0
        layer.factors["lam"][0] = 0.5
    with pytest.warns(UserWarning, match="pruned singular values"):
        export_peft_lora(model, tmp_path / "peft")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)


class _Nested(nn.Module):
    """``a.proj`` and ``b.a.proj``: the second name ends with ``.`` + the first."""

    def __init__(self):
        super().__init__()
        self.a = _Block()
        self.b = nn.Module()
        self.b.a = _Block()

    def forward(self, x):
        return self.b.a.proj(torch.relu(self.a.proj(x)))


@pytest.mark.parametrize("targets", ["a_only", "both"])
def test_colliding_suffixes_get_anchored_names(targets, tmp_path):
    torch.manual_seed(0)
    base = _Nested()
    pattern = r"a\.proj" if targets == "a_only" else r"(b\.)?a\.proj"
    model = ha.wrap(copy.deepcopy(base), ha.AdapterConfig(method="adalora", r=4, target_modules=pattern,
                                                          allocator=ha.AllocatorConfig(total_step=10, target_r=2)))
    with torch.no_grad():
        for i, layer in enumerate(model.adapted_layers.values()):
            layer.factors["lam"].copy_(torch.tensor([0.5, 0.0, -0.7, 0.3]))
            layer.rank_mask.copy_(torch.tensor([1.0, 0.0, 1.0, float(i)]))  # ranks 2 and 3
            layer.factors["lam"].mul_(layer.rank_mask)
    export_peft_lora(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    if targets == "a_only":
        # the list ["a.proj"] would also adapt b.a.proj in peft: an exact regex is written instead
        assert cfg["target_modules"] == r"^(?:a\.proj)$" and cfg["rank_pattern"] == {"a.proj": 2}
    else:
        # as a rank_pattern key "a.proj" would also match "b.a.proj": keys are anchored
        assert sorted(cfg["target_modules"]) == ["a.proj", "b.a.proj"]
        assert cfg["rank_pattern"] == {r"^a\.proj": 2, r"^b\.a\.proj": 3}
    assert cfg["task_type"] is None
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    assert peft_ranks(peft_model) == model.ranks
    x = torch.randn(3, 8)
    torch.testing.assert_close(logits(peft_model, {"x": x}), logits(model, {"x": x}), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(peft_model.merge_and_unload(), {"x": x}), logits(model, {"x": x}),
                               rtol=1e-5, atol=1e-6)


def test_training_mode_restored_and_training_continues(tmp_path):
    _, model, batch_fn = trained("bert", "adalora", "hyper", steps=3)
    model.train()
    export_peft_lora(model, tmp_path / "peft")
    assert model.training and all(m.training for m in model.modules())
    train_steps(model, 2, batch_fn, start=3)  # the hyper source regenerates with gradients again


def test_rejects_merged_and_non_adapted_models(tmp_path):
    _, model, _ = trained("bert", "lora", "direct", steps=1)
    with pytest.raises(TypeError, match="AdaptedModel"):
        export_peft_lora(model.model, tmp_path / "x")
    model.merge()
    with pytest.raises(ValueError, match="unmerge"):
        export_peft_lora(model, tmp_path / "x")
    model.unmerge()
    assert ha.export_peft_lora is export_peft_lora  # public API
    ha.export_peft_lora(model, tmp_path / "x", base_model_name_or_path="org/tiny-bert")
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/tiny-bert"
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_sequence_classifier_without_a_saved_head_loads_in_peft(tmp_path):
    """A SEQ_CLS task type makes peft add the head to modules_to_save and look for its weights in the
    file; an adapter that did not train the head has none, so the export must not claim SEQ_CLS."""
    base = tiny_bert()
    model = ha.wrap(copy.deepcopy(base), config("lora", "direct", BERT_TARGETS, ()))
    train_steps(model, STEPS, bert_batch)
    cfg, _ = check_peft_matches(base, model, bert_batch, tmp_path / "peft")
    assert cfg["modules_to_save"] is None
