"""Every documented bad input raises a clear error naming the field and the allowed values."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hyperadalora as ha
from tiny_models import BERT_TARGETS, bert_batch, tiny_bert, tiny_llama


def test_target_modules_matching_nothing_lists_available_names():
    with pytest.raises(ValueError, match=r"matched no module.*query.*value") as info:
        ha.wrap(tiny_bert(), ha.AdapterConfig(target_modules=["q_proj"]))
    assert "dense" in str(info.value) and "key" in str(info.value)
    with pytest.raises(ValueError, match="Available linear module names: .*gate_proj"):
        ha.wrap(tiny_llama(), ha.AdapterConfig(target_modules=r"nothing\.here"))


def test_target_module_that_is_not_linear():
    with pytest.raises(ValueError, match="only nn.Linear and Conv1D"):
        ha.wrap(tiny_bert(), ha.AdapterConfig(target_modules=["LayerNorm"]))


@pytest.mark.parametrize("r", [0, -3])
def test_nonpositive_rank(r):
    with pytest.raises(ValueError, match=r"AdapterConfig\.r=.*positive"):
        ha.AdapterConfig(r=r)


def test_rank_of_wrong_type():
    with pytest.raises(TypeError, match=r"AdapterConfig\.r must be an int"):
        ha.AdapterConfig(r=2.5)


def test_target_r_above_init_r():
    with pytest.raises(ValueError, match=r"target_r \(9\) must be <= r \(6\)"):
        ha.AdapterConfig(method="adalora", r=6, allocator=ha.AllocatorConfig(total_step=10, target_r=9))


def test_adalora_without_total_step():
    with pytest.raises(ValueError, match="total_step is required"):
        ha.AllocatorConfig(target_r=2)
    with pytest.raises(ValueError, match="needs allocator=AllocatorConfig"):
        ha.AdapterConfig(method="adalora")


def test_schedule_without_budget_phase():
    with pytest.raises(ValueError, match=r"tinit \(6\) \+ tfinal \(4\) must be < total_step \(10\)"):
        ha.AllocatorConfig(total_step=10, tinit=6, tfinal=4)


def test_negative_gamma():
    with pytest.raises(ValueError, match=r"AdapterConfig\.gamma=-0\.1 must be >= 0"):
        ha.AdapterConfig(gamma=-0.1)


def test_unknown_method_policy_source_and_hyper_settings():
    with pytest.raises(ValueError, match="method='lokr' is not supported; allowed values: lora, adalora, dora, dylora"):
        ha.AdapterConfig(method="lokr")
    with pytest.raises(ValueError, match="policy='greedy' is not supported; allowed values: adalora, sensitivity, sigma-grad"):
        ha.AllocatorConfig(total_step=10, policy="greedy")
    with pytest.raises(ValueError, match="source='learned' is not supported; allowed values: direct, hyper"):
        ha.AdapterConfig(source="learned")
    with pytest.raises(ValueError, match="arch='rnn' is not supported; allowed values: attention, mlp, cnn"):
        ha.HyperConfig(arch="rnn")


def test_unknown_config_field_is_named():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank'\]"):
        ha.AdapterConfig.from_dict({"rank": 4})


def test_allocator_with_non_adalora_method():
    with pytest.raises(ValueError, match="allocator is only used with method='adalora'"):
        ha.AdapterConfig(method="lora", allocator=ha.AllocatorConfig(total_step=10))


def test_loading_adapter_onto_model_with_other_shapes(tmp_path):
    m = ha.wrap(tiny_bert(), ha.AdapterConfig(method="lora", target_modules=BERT_TARGETS))
    m.save_adapter(tmp_path / "ad")
    other = tiny_bert()
    other.bert.encoder.layer[0].attention.self.query = nn.Linear(32, 16)  # a different shape
    with pytest.raises(ValueError, match=r"module 'bert\.encoder\.layer\.0\.attention\.self\.query' is \(out=16"):
        ha.load_adapter(other, tmp_path / "ad")


def test_loading_a_directory_that_is_not_an_adapter(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved hyperadalora adapter"):
        ha.load_adapter(tiny_bert(), tmp_path)


def test_saving_adalora_trained_without_after_step_raises(tmp_path):
    m = ha.wrap(tiny_bert(), ha.AdapterConfig(method="adalora", r=4, target_modules=BERT_TARGETS,
                                              allocator=ha.AllocatorConfig(total_step=10, target_r=2)))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    m.train()
    for step in range(3):
        m(**bert_batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    with pytest.raises(RuntimeError, match="after_step\\(\\) was never called"):
        m.save_adapter(tmp_path / "ad")
    assert not (tmp_path / "ad").exists(), "nothing may be written for a broken run"


def test_saving_untrained_or_lora_models_is_fine(tmp_path):
    """Only an AdaLoRA model that trained without ``after_step`` is refused: an untrained AdaLoRA
    model and a LoRA model that trained (no allocator) save, and load back to the same outputs."""
    m = ha.wrap(tiny_bert(), ha.AdapterConfig(method="adalora", r=4, target_modules=BERT_TARGETS,
                                              allocator=ha.AllocatorConfig(total_step=10, target_r=2)))
    m.save_adapter(tmp_path / "untrained")
    lora = ha.wrap(tiny_bert(), ha.AdapterConfig(method="lora"))
    lora.train()
    lora(**bert_batch(0)).loss.backward()
    torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=1.0).step()  # no after_step
    lora.save_adapter(tmp_path / "lora")
    batch = bert_batch(1)
    for model, folder in ((m, "untrained"), (lora, "lora")):
        loaded = ha.load_adapter(tiny_bert(), tmp_path / folder)
        assert loaded.adapter_config == model.adapter_config
        with torch.no_grad():
            assert torch.equal(loaded.eval()(**batch).logits, model.eval()(**batch).logits), folder
    with torch.no_grad():
        assert not torch.equal(lora(**batch).logits, tiny_bert().eval()(**batch).logits)


def test_wrong_after_step_argument():
    m = ha.wrap(tiny_bert(), ha.AdapterConfig(method="dylora"))
    with pytest.raises(ValueError, match="non-negative int"):
        m.after_step(-1)
    with pytest.raises(ValueError, match="non-negative int"):
        m.after_step(copy.copy(1.5))
