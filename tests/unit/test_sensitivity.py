"""``allocator.policy="sensitivity"``: calibration, per-module ranks, and adapters built at those ranks.

References: a hand pipeline (plain forward hooks + the tested arithmetic), a plain LoRA created
with the same ``rank_pattern``, peft's ``LoraConfig(rank_pattern=...)``, and save / load / export
round trips.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hyperadalora as ha
from hyperadalora.allocation import sensitivity_rank_pattern
from hyperadalora.allocation.sensitivity_math import allocate_ranks, combined_scores, matrix_sensitivity
from hyperadalora.checkpoint import load_adapter
from hyperadalora.export import export_peft_lora
from hyperadalora.inject import find_target_modules
from hyperadalora.methods import METHOD_REGISTRY
from tiny_models import BERT_TARGETS, LLAMA_TARGETS, bert_batch, llama_batch, tiny_bert, tiny_llama, train_steps

HYPER = ha.HyperConfig(hidden=24, layers=1)


def calibration(batch_fn=bert_batch, n=3):
    """Batches with padding in them (the mask must keep padded tokens out)."""
    out = []
    for i in range(n):
        b = batch_fn(100 + i)
        b["attention_mask"] = b["attention_mask"].clone()
        b["attention_mask"][0, -3:] = 0
        out.append(b)
    return out


def sens_config(method="lora", source="direct", targets=BERT_TARGETS, save=("classifier",), **alloc):
    allocator = ha.AllocatorConfig(policy="sensitivity", **alloc)
    return ha.AdapterConfig(method=method, source=source, r=4, lora_alpha=8, seed=3, target_modules=targets,
                            modules_to_save=save, allocator=allocator, hyper=HYPER)


def test_calibration_never_changes_the_base_model():
    model = tiny_bert()
    model.train()
    model.bert.encoder.layer[0].eval()  # a mixed train / eval state must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = find_target_modules(model, sens_config())
    sensitivity_rank_pattern(model, names, calibration(), ha.AllocatorConfig(policy="sensitivity"), average_rank=4)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def hand_ranks(model, names, batches, settings, average):
    """Inputs captured by plain forward hooks, ``diag(2 X^T X)`` over real tokens, the tested arithmetic."""
    inputs = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: inputs[n].append(a[0]))
               for n in names]
    model.eval()
    with torch.no_grad():
        masks = []
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            masks.append(b["attention_mask"].bool())
    for h in handles:
        h.remove()
    metrics, caps, costs = {}, {}, {}
    for n in names:
        # (real tokens, d_in); the pooler sees one (CLS) row per example, nothing padded
        x = torch.cat([t[m] if t.dim() == 3 else t for t, m in zip(inputs[n], masks)]).double()
        w = model.get_submodule(n).weight
        metrics[n] = matrix_sensitivity(torch.diagonal(2 * x.t() @ x), d_out=w.shape[0], diagonal=settings.diagonal)
        caps[n] = min(w.shape)
        costs[n] = sum(w.shape)  # a LoRA rank's parameters, d_out + d_in
    if settings.budget == "params":
        return allocate_ranks(combined_scores(metrics), average * sum(costs.values()), caps, settings.min_rank, costs)
    return allocate_ranks(combined_scores(metrics), average * len(names), caps, settings.min_rank)


@pytest.mark.parametrize("diagonal", ["channel", "weight"])
def test_rank_pattern_equals_the_hand_pipeline_and_its_total_is_exact(diagonal):
    model = tiny_bert()
    names = find_target_modules(model, sens_config())
    settings = ha.AllocatorConfig(policy="sensitivity", diagonal=diagonal)
    ranks = sensitivity_rank_pattern(model, names, calibration(), settings, average_rank=4)
    assert ranks == hand_ranks(model, names, calibration(), settings, 4)
    assert sum(ranks.values()) == 4 * len(names) and min(ranks.values()) >= 1
    assert len(set(ranks.values())) > 1  # the layers really differ


@pytest.mark.parametrize("model_fn,batch_fn,targets", [(tiny_bert, bert_batch, BERT_TARGETS),
                                                      (tiny_llama, llama_batch, LLAMA_TARGETS)])
def test_parameter_budget_spends_a_uniform_loras_parameters(model_fn, batch_fn, targets):
    base = model_fn()
    save = ("classifier",) if model_fn is tiny_bert else ()
    config = sens_config(targets=targets, save=save, budget="params")
    names = find_target_modules(base, config)
    ranks = sensitivity_rank_pattern(base, names, calibration(batch_fn), config.allocator, average_rank=4)
    assert ranks == hand_ranks(base, names, calibration(batch_fn), config.allocator, 4)
    model = ha.wrap(copy.deepcopy(base), config, calibration=calibration(batch_fn))
    assert model.adapter_config.rank_pattern == ranks
    uniform = ha.wrap(copy.deepcopy(base), ha.AdapterConfig(method="lora", r=4, lora_alpha=8, seed=3,
                                                            target_modules=targets, modules_to_save=save))
    spent, budget = model.trainable_parameters()[0], uniform.trainable_parameters()[0]
    widest = max(sum(base.get_submodule(n).weight.shape) for n in names)
    assert budget - widest < spent <= budget  # within one rank of the widest matrix, never above
    by_rank = sensitivity_rank_pattern(base, names, calibration(batch_fn), ha.AllocatorConfig(policy="sensitivity"),
                                       average_rank=4)
    assert sum(by_rank.values()) == 4 * len(names) and by_rank != ranks  # the two budgets really differ


def test_wrap_with_calibration_equals_plain_lora_with_the_same_rank_pattern():
    base = tiny_bert()
    model = ha.wrap(copy.deepcopy(base), sens_config(), calibration=calibration())
    pattern = model.adapter_config.rank_pattern
    assert {n: layer.r for n, layer in model.adapted_layers.items()} == pattern
    plain = ha.wrap(copy.deepcopy(base), ha.AdapterConfig(method="lora", r=4, lora_alpha=8, seed=3,
                                                          target_modules=BERT_TARGETS, modules_to_save=("classifier",),
                                                          rank_pattern=pattern))
    # Allocated at the chosen ranks: parameters are those of LoRA with that pattern, nothing masked.
    lora_params = sum(r * (m.in_features + m.out_features) for r, m in
                      ((pattern[n], base.get_submodule(n)) for n in pattern))
    head = sum(p.numel() for p in base.classifier.parameters())
    assert model.trainable_parameters()[0] == plain.trainable_parameters()[0] == lora_params + head
    assert train_steps(model, 3) == train_steps(plain, 3)
    assert model.allocator.name == "sensitivity" and not model.allocator.adaptive
    assert model.ranks == pattern


def test_peft_lora_with_the_same_rank_pattern_trains_identically():
    peft = pytest.importorskip("peft")
    base = tiny_bert()
    model = ha.wrap(copy.deepcopy(base), sens_config(), calibration=calibration())
    pattern = model.adapter_config.rank_pattern
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(pattern), rank_pattern=dict(pattern),
                          modules_to_save=["classifier"])
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # same initial factors (peft draws its own)
        inner = dict(theirs.base_model.model.named_modules())
        for name, layer in model.adapted_layers.items():
            assert inner[name].r["default"] == pattern[name]
            inner[name].lora_A["default"].weight.copy_(layer.factors["A"])
            inner[name].lora_B["default"].weight.copy_(layer.factors["B"])
    ours_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    their_opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    theirs.train()
    for step in range(4):
        batch = bert_batch(step)
        a, b = model(**batch).loss, theirs(**batch).loss
        assert abs(a.item() - b.item()) < 1e-6
        for loss, opt in ((a, ours_opt), (b, their_opt)):
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.after_step(step)


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_rank_zero_module_is_unadapted_and_saves_loads_merges_and_exports(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_bert()
    cfg = sens_config(min_rank=0, avg_rank=1, max_rank=4)
    model = ha.wrap(copy.deepcopy(base), cfg, calibration=calibration())
    pattern = model.adapter_config.rank_pattern
    dropped = [n for n, r in pattern.items() if r == 0]
    assert dropped, pattern  # an average of 1 with a cap of 4 leaves some module out
    assert all(type(model.model.get_submodule(n)) is nn.Linear for n in dropped)
    assert set(model.adapted_layers) == {n for n, r in pattern.items() if r > 0}
    train_steps(model, 3)
    batch = bert_batch(11)
    ours = logits(model, batch)
    model.save_adapter(str(tmp_path / "ad"))
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "ad")  # no calibration: the pattern is saved
    assert loaded.adapter_config.rank_pattern == pattern
    torch.testing.assert_close(logits(loaded, batch), ours)
    export_peft_lora(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    torch.testing.assert_close(logits(theirs, batch), ours, rtol=1e-5, atol=1e-6)
    ranks = {n: m.r["default"] for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert ranks == {n: r for n, r in pattern.items() if r > 0}
    model.merge()
    torch.testing.assert_close(logits(model, batch), ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source", ["direct", "hyper"])
@pytest.mark.parametrize("method", list(METHOD_REGISTRY))
def test_every_method_and_source_builds_at_the_decided_ranks(method, source, tmp_path):
    base = tiny_llama()
    extra = dict(total_step=6) if method == "adalora" else {}
    cfg = sens_config(method, source, LLAMA_TARGETS, (), diagonal="weight", **extra)
    model = ha.wrap(copy.deepcopy(base), cfg, calibration=calibration(llama_batch))
    pattern = model.adapter_config.rank_pattern
    assert {n: layer.r for n, layer in model.adapted_layers.items()} == pattern
    assert len(set(pattern.values())) > 1
    losses = train_steps(model, 3, llama_batch)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert model.ranks == pattern  # never pruned (then="none")
    model.save_adapter(str(tmp_path / "ad"))
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "ad")
    batch = llama_batch(5)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch))


def test_config_shape_and_errors():
    # Every method takes the policy; a one-shot allocation needs no schedule.
    assert ha.AdapterConfig(method="dora", allocator={"policy": "sensitivity"}).allocator.then == "none"
    with pytest.raises(ValueError, match="then"):
        ha.AllocatorConfig(policy="adalora", total_step=10, then="adalora")
    with pytest.raises(ValueError, match="allocator is only used"):
        ha.AdapterConfig(method="lora", allocator={"policy": "sensitivity", "then": "adalora", "total_step": 10})
    with pytest.raises(ValueError, match="total_step"):
        ha.AllocatorConfig(policy="sensitivity", then="adalora")
    with pytest.raises(ValueError, match="min_rank"):
        ha.AllocatorConfig(policy="sensitivity", min_rank=3, max_rank=2)
    with pytest.raises(ValueError, match="budget.*ranks, params"):
        ha.AllocatorConfig(policy="sensitivity", budget="flops")
    with pytest.raises(ValueError, match="calibration"):
        ha.wrap(tiny_bert(), sens_config())
    with pytest.raises(ValueError, match="matches none"):
        ha.wrap(tiny_bert(), ha.AdapterConfig(target_modules=BERT_TARGETS, rank_pattern={"nope": 2}))
    with pytest.raises(ValueError, match="rank 0"):
        ha.wrap(tiny_bert(), ha.AdapterConfig(target_modules=["query"], rank_pattern={"query": 0}))
    # The config (with its pattern) round-trips through JSON, as adapters save it.
    done = ha.wrap(tiny_bert(), sens_config(), calibration=calibration()).adapter_config
    assert ha.AdapterConfig.from_json(done.to_json()) == done


def ragged_then(source, then, tmp_path=None):
    """Sensitivity-LoRA's mixed initial ranks, then AdaLoRA-style pruning during training."""
    cfg = sens_config("adalora", source, total_step=8, tinit=1, tfinal=2, deltaT=1, target_r=2, then=then)
    return ha.wrap(tiny_bert(), cfg, calibration=calibration())


def test_then_adalora_prunes_mixed_initial_ranks_by_one_global_threshold():
    """peft's rule over ragged ranks, by hand: keep the components scoring above the
    (init_bgt - budget)-th smallest score among all the components that exist."""
    model = ragged_then("direct", "adalora")
    initial = {n: layer.r for n, layer in model.adapted_layers.items()}
    assert len(set(initial.values())) > 1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    checked = 0
    for step in range(7):  # up to (not past) the final allocation, after which the scores are reset
        model(**bert_batch(step % 3)).loss.backward()
        opt.step()
        model.after_step(step)
        opt.zero_grad()
        budget, masked_now = model.allocator.budget_schedule(step)
        if not masked_now or step == 6:
            continue
        scores = model.allocator.triplet_scores()
        rows = [scores[i, :r] for i, r in enumerate(initial.values())]
        k = sum(initial.values()) - budget
        threshold = torch.sort(torch.cat(rows)).values[k - 1]
        expected = {n: (row > threshold).tolist() for n, row in zip(initial, rows)}
        assert model.rank_pattern == expected
        checked += 1
    assert checked >= 2
    assert all(len(model.rank_pattern[n]) == r for n, r in initial.items())


@pytest.mark.parametrize("source,then", [("direct", "adalora"), ("hyper", "adalora"), ("direct", "sigma-grad")])
def test_then_policies_train_mixed_ranks_to_the_budget_and_round_trip(source, then, tmp_path):
    model = ragged_then(source, then)
    initial = {n: layer.r for n, layer in model.adapted_layers.items()}
    train_steps(model, 8)
    assert model.allocator.total_rank() <= model.allocator.target_bgt
    assert all(0 <= model.ranks[n] <= r for n, r in initial.items())
    model.save_adapter(str(tmp_path / "ad"))
    loaded = load_adapter(tiny_bert(), tmp_path / "ad")
    assert loaded.rank_pattern == model.rank_pattern
    batch = bert_batch(5)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch))
