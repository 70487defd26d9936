"""Behaviour of the adapters against hand-computed references and round trips."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import MPNetConfig, MPNetForSequenceClassification

import hyperadalora as ha
from hyperadalora.methods import METHOD_REGISTRY
from tiny_models import (BERT_TARGETS, LLAMA_TARGETS, bert_batch, llama_batch, tiny_bert, tiny_gpt2, tiny_llama,
                         train_steps)

METHODS = list(METHOD_REGISTRY)


def tiny_mpnet(seed=0):
    torch.manual_seed(seed)
    cfg = MPNetConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=48, max_position_embeddings=70, num_labels=2,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return MPNetForSequenceClassification(cfg)


ARCHS = {
    "bert": (tiny_bert, bert_batch),
    "llama": (tiny_llama, llama_batch),
    "mpnet": (tiny_mpnet, bert_batch),
    "gpt2": (tiny_gpt2, llama_batch),
}


def config_for(method, **kw):
    if method == "adalora":
        kw.setdefault("allocator", ha.AllocatorConfig(total_step=20, target_r=2, tinit=2, tfinal=4))
        kw.setdefault("r", 6)
    else:
        kw.setdefault("r", 4)
    return ha.AdapterConfig(method=method, **kw)


@torch.no_grad()
def randomize_factors(model: ha.AdaptedModel, seed=5):
    g = torch.Generator().manual_seed(seed)
    for layer in model.adapted_layers.values():
        for t in layer.factors.values():
            t.copy_(0.2 * torch.randn(t.shape, generator=g))
        if hasattr(layer, "magnitude"):
            layer.magnitude.mul_(1 + 0.1 * torch.rand(layer.magnitude.shape, generator=g))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", METHODS)
def test_zero_initialised_adapter_reproduces_base(arch, method):
    build, batch_fn = ARCHS[arch]
    base = build().eval()
    batch = {k: v for k, v in batch_fn(1).items() if k != "labels"}
    with torch.no_grad():
        ref = base(**batch).logits
        model = ha.wrap(copy.deepcopy(base), config_for(method)).eval()
        got = model(**batch).logits
    assert len(model.adapted_layers) > 0
    if method == "dora":  # m / ||W0|| is 1 up to rounding of the two norm computations
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, ref)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_round_trip(arch, method):
    build, batch_fn = ARCHS[arch]
    model = ha.wrap(build(), config_for(method)).eval()
    randomize_factors(model)
    batch = {k: v for k, v in batch_fn(2).items() if k != "labels"}
    before = {n: layer.base_weight.detach().clone() for n, layer in model.adapted_layers.items()}
    with torch.no_grad():
        unmerged_out = model(**batch).logits
        model.merge()
        merged_out = model(**batch).logits
        changed = max((layer.base_weight - before[n]).abs().max().item() for n, layer in model.adapted_layers.items())
        model.unmerge()
        restored_out = model(**batch).logits
    assert changed > 1e-4, "merging must change the base weights"
    torch.testing.assert_close(merged_out, unmerged_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(restored_out, unmerged_out, rtol=1e-4, atol=1e-5)
    for n, layer in model.adapted_layers.items():
        torch.testing.assert_close(layer.base_weight, before[n], rtol=0, atol=1e-6)


def test_merged_weight_equals_hand_formula_lora_and_adalora():
    lin = nn.Linear(8, 6)
    for method in ("lora", "adalora"):
        holder = nn.Sequential(copy.deepcopy(lin))
        m = ha.wrap(holder, config_for(method, target_modules=["0"], lora_alpha=3.0))
        randomize_factors(m)
        layer = m.adapted_layers["0"]
        f = {k: v.detach() for k, v in layer.factors.items()}
        if method == "lora":
            expected = lin.weight + (3.0 / 4) * f["B"] @ f["A"]
        else:
            expected = lin.weight + 3.0 / (6 + 1e-5) * f["P"] @ torch.diag(f["lam"]) @ f["Q"]
        torch.testing.assert_close(layer.delta_weight() + lin.weight, expected.detach(), rtol=1e-6, atol=1e-6)
        x = torch.randn(5, 8)
        torch.testing.assert_close(m(x), x @ expected.detach().T + lin.bias.detach(), rtol=1e-5, atol=1e-6)


def test_dylora_uses_sampled_rank_in_training_and_full_rank_in_eval():
    lin = nn.Linear(10, 7)
    m = ha.wrap(nn.Sequential(copy.deepcopy(lin)), ha.AdapterConfig(method="dylora", r=6, lora_alpha=4.0,
                                                                    target_modules=["0"], seed=3))
    randomize_factors(m)
    layer = m.adapted_layers["0"]
    a, b = layer.factors["A"].detach(), layer.factors["B"].detach()
    x = torch.randn(4, 10)
    seen = set()
    m.train()
    for step in range(40):
        k = m.dylora_rank
        assert 1 <= k <= 6
        seen.add(k)
        expected = lin(x) + (4.0 / k) * (x @ a[:k].T) @ b[:, :k].T
        torch.testing.assert_close(m(x), expected.detach(), rtol=1e-5, atol=1e-6)
        m.after_step(step)
    assert len(seen) >= 4, f"b must be sampled across steps, saw {seen}"
    m.eval()
    torch.testing.assert_close(m(x), (lin(x) + (4.0 / 6) * (x @ a.T) @ b.T).detach(), rtol=1e-5, atol=1e-6)


def test_dylora_gradient_reaches_only_first_b_components():
    m = ha.wrap(nn.Sequential(nn.Linear(10, 7)), ha.AdapterConfig(method="dylora", r=6, target_modules=["0"]))
    randomize_factors(m)
    m.train()
    k = m.dylora_rank
    m(torch.randn(3, 10)).sum().backward()
    ga = m.adapted_layers["0"].factors["A"].grad
    assert ga[:k].abs().sum() > 0 and ga[k:].abs().sum() == 0


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(tmp_path, method):
    base = tiny_bert()
    model = ha.wrap(copy.deepcopy(base), config_for(method, modules_to_save=("classifier",), target_modules=BERT_TARGETS))
    train_steps(model, 8, bert_batch, lr=1e-2)
    model.save_adapter(tmp_path / "ad")
    loaded = ha.load_adapter(copy.deepcopy(base), tmp_path / "ad")
    model.eval()
    loaded.eval()
    batch = bert_batch(9)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert loaded.rank_pattern == model.rank_pattern
    if method == "adalora":
        assert loaded.budget == model.budget
        for k, v in model.allocator.state_dict().items():
            assert torch.equal(v, loaded.allocator.state_dict()[k]), k


def test_adalora_training_continues_identically_after_reload(tmp_path):
    base = tiny_llama()
    cfg = config_for("adalora", target_modules=LLAMA_TARGETS)
    straight = ha.wrap(copy.deepcopy(base), cfg)
    train_steps(straight, 6, llama_batch, lr=1e-2)
    straight.save_adapter(tmp_path / "mid")
    reloaded = ha.load_adapter(copy.deepcopy(base), tmp_path / "mid")
    assert reloaded.allocator.rank_pattern == straight.allocator.rank_pattern
    assert reloaded.budget == straight.budget
    assert torch.equal(reloaded.allocator.masks(), straight.allocator.masks())
    # Both continue from the saved state (fresh optimizers: optimizer state is not part of an adapter).
    cont_straight = train_steps(straight, 8, llama_batch, lr=1e-2, start=6)
    cont_reloaded = train_steps(reloaded, 8, llama_batch, lr=1e-2, start=6)
    assert cont_straight == cont_reloaded
    assert reloaded.allocator.rank_pattern == straight.allocator.rank_pattern


def test_regularizer_matches_hand_computation():
    for form in ("peft", "paper"):
        m = ha.wrap(tiny_bert(), config_for("adalora", target_modules=BERT_TARGETS, orth_reg=form, gamma=0.7))
        randomize_factors(m)
        terms = []
        for layer in m.adapted_layers.values():
            p, q = layer.factors["P"], layer.factors["Q"]
            for gram in (p.T @ p, q @ q.T):
                d = gram - torch.eye(gram.shape[0])
                terms.append((d * d).sum() if form == "paper" else torch.sqrt((d * d).sum()))
        expected = torch.stack(terms).sum() if form == "paper" else torch.stack(terms).mean()
        torch.testing.assert_close(m.orthogonality_regularizer(), expected, rtol=1e-5, atol=1e-6)
        m.train()
        batch = bert_batch(0)
        out = m(**batch)
        m.eval()
        task = m(**batch).loss  # eval mode: no regulariser added
        torch.testing.assert_close(out.loss, task + 0.7 * expected, rtol=1e-5, atol=1e-6)


def test_sigma_grad_policy_prunes_permanently_to_target_budget():
    alloc = ha.AllocatorConfig(total_step=24, target_r=2, tinit=2, tfinal=4, deltaT=2, policy="sigma-grad")
    m = ha.wrap(tiny_bert(), ha.AdapterConfig(method="adalora", r=6, allocator=alloc,
                                              target_modules=BERT_TARGETS, modules_to_save=("classifier",)))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    pruned_so_far = torch.zeros(len(m.adapted_layers), 6, dtype=torch.bool)
    budgets = []
    for step in range(24):
        m(**bert_batch(step % 3)).loss.backward()
        opt.step()
        m.after_step(step)
        opt.zero_grad()
        masks = m.allocator.masks() == 0
        assert not (pruned_so_far & ~masks).any(), "a pruned singular value came back"
        pruned_so_far = masks
        for i, layer in enumerate(m.adapted_layers.values()):
            assert torch.all(layer.factors["lam"].detach()[masks[i]] == 0)
        budgets.append(m.budget)
    assert budgets == sorted(budgets, reverse=True)
    assert m.allocator.total_rank() == 2 * len(m.adapted_layers)


def test_after_step_without_gradients_raises():
    m = ha.wrap(tiny_bert(), config_for("adalora", target_modules=BERT_TARGETS))
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        m.after_step(0)


def test_all_linear_skips_heads_and_finds_every_block_linear():
    bert = ha.wrap(tiny_bert(), ha.AdapterConfig(method="lora"))
    assert not any("classifier" in n for n in bert.adapted_layers)
    assert len(bert.adapted_layers) == 2 * 6 + 1  # 6 per layer + pooler.dense
    llama = ha.wrap(tiny_llama(), ha.AdapterConfig(method="lora"))
    assert not any("lm_head" in n for n in llama.adapted_layers) and len(llama.adapted_layers) == 14
    mpnet = ha.wrap(tiny_mpnet(), ha.AdapterConfig(method="lora"))
    assert not any(n.startswith("classifier") for n in mpnet.adapted_layers)


def test_base_frozen_and_only_adapters_and_saved_modules_train():
    m = ha.wrap(tiny_bert(), ha.AdapterConfig(method="dora", modules_to_save=("classifier",)))
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all((".factors." in n) or n.endswith(".magnitude") or ".classifier." in n for n in names)
    assert any(".classifier." in n for n in names)


def test_regex_target_and_unwrap():
    base = tiny_bert()
    ref_types = {n: type(mod) for n, mod in base.named_modules()}
    batch = {k: v for k, v in bert_batch(0).items() if k != "labels"}
    with torch.no_grad():
        ref = base.eval()(**batch).logits
    m = ha.wrap(copy.deepcopy(base), ha.AdapterConfig(method="lora", target_modules=r".*attention\.self\.(query|value)"))
    assert len(m.adapted_layers) == 4
    randomize_factors(m)
    plain = m.unwrap(merge=False).eval()
    assert {n: type(mod) for n, mod in plain.named_modules()} == ref_types
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, ref)


def test_config_json_round_trip(tmp_path):
    cfg = config_for("adalora", target_modules=["query", "value"], modules_to_save=["classifier"], gamma=0.2)
    again = ha.AdapterConfig.from_json(cfg.to_json(tmp_path / "c.json"))
    assert again == cfg
    assert ha.AdapterConfig.from_dict(cfg.to_dict()) == cfg


def test_atomic_writes_refuse_to_replace_a_device_or_folder(tmp_path):
    from hyperadalora.fileio import write_json

    with pytest.raises(ValueError, match="not a regular file"):
        write_json(tmp_path, {"a": 1})  # a folder
    import os
    import stat

    with pytest.raises(ValueError, match="not a regular file"):
        write_json(Path("/dev/null"), {"a": 1})
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    write_json(tmp_path / "ok.json", {"a": 1})
    assert (tmp_path / "ok.json").read_text().strip().startswith("{")
