"""AllocatorConfig.compact: cutting pruned AdaLoRA components (and their optimizer state) away.

The reference for every identity is the same model trained without compaction (peft's
semantics: pruned components masked at full rank): the loss, the next optimizer step and the
optimizer state on the kept components must agree to 1e-6.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import hyperadalora as ha
from hyperadalora.allocation.compaction import optimizer_state_bytes
from hyperadalora.methods.adalora import orthogonality_penalty
from hyperadalora.train.resume import load_training_checkpoint, save_training_checkpoint
from tiny_models import BERT_TARGETS, bert_batch, tiny_bert

TOTAL, TFINAL = 10, 4
FINAL = TOTAL - TFINAL  # the step at which the final budget is fixed (and compaction happens)


# Generation per token (no attention across rank components, no rank-position embeddings).
PER_TOKEN = ha.HyperConfig(arch="mlp", context=False, hidden=16, layers=1, mode="anchored")


def make(compact: str, policy: str = "adalora", gamma: float = 0.0, base=None, source: str = "direct"):
    alloc = ha.AllocatorConfig(total_step=TOTAL, target_r=2, tinit=1, tfinal=TFINAL, deltaT=1, policy=policy,
                               compact=compact)
    config = ha.AdapterConfig(method="adalora", r=6, lora_alpha=8, seed=3, gamma=gamma, target_modules=BERT_TARGETS,
                              modules_to_save=("classifier",), allocator=alloc, source=source, hyper=PER_TOKEN)
    return ha.wrap(copy.deepcopy(base if base is not None else tiny_bert()), config)


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.1)


def step(model, opt, i):
    loss = model(**bert_batch(i % 3)).loss
    loss.backward()
    opt.step()
    model.after_step(i)
    compacted = model.compact(opt)
    opt.zero_grad(set_to_none=True)
    return loss.detach(), compacted


def run_pair(policy, gamma=0.0, steps=FINAL + 1, source="direct"):
    """A compacting model and its uncompacted twin after ``steps`` identical steps."""
    base = tiny_bert()
    ours, ref = make("final", policy, gamma, base, source), make("off", policy, gamma, base, source)
    opt_ours, opt_ref = optimizer(ours), optimizer(ref)
    ours.train(), ref.train()
    for i in range(steps):
        a, done = step(ours, opt_ours, i)
        b, _ = step(ref, opt_ref, i)
        assert done == (i == FINAL)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    return ours, ref, opt_ours, opt_ref


def kept_index(ref, name):
    return (ref.adapted_layers[name].rank_mask > 0).nonzero().flatten()


def assert_factors_match(ours, ref, opt_ours=None, opt_ref=None):
    for name, layer in ours.adapted_layers.items():
        idx = kept_index(ref, name)
        ref_layer = ref.adapted_layers[name]
        assert layer.r == len(idx) and layer.ranknum == ref_layer.ranknum == 6
        for kind, dim in (("P", 1), ("lam", 0), ("Q", 0)):
            p, q = layer.factors[kind], ref_layer.factors[kind]
            torch.testing.assert_close(p.detach(), q.detach().index_select(dim, idx), rtol=0, atol=1e-6)
            if opt_ours is not None:
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(opt_ours.state[p][key], opt_ref.state[q][key].index_select(dim, idx),
                                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("policy", ["adalora", "sigma-grad"])
def test_loss_and_next_steps_identical_after_compaction(policy):
    ours, ref, opt_ours, opt_ref = run_pair(policy)
    assert ours.ranks == ref.ranks and ours.budget == ref.budget == 2 * len(ours.layer_list)
    assert sum(layer.r for layer in ours.layer_list) == ours.budget < 6 * len(ours.layer_list)  # really cut
    assert_factors_match(ours, ref, opt_ours, opt_ref)
    for i in range(FINAL + 1, TOTAL + 2):  # the following steps, past total_step too
        a, _ = step(ours, opt_ours, i)
        b, _ = step(ref, opt_ref, i)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert_factors_match(ours, ref, opt_ours, opt_ref)
    ours.eval(), ref.eval()
    with torch.no_grad():
        batch = bert_batch(5)
        torch.testing.assert_close(ours(**batch).logits, ref(**batch).logits, rtol=0, atol=1e-6)


def test_hyper_source_compaction_keeps_loss_next_steps_and_hypernetworks():
    ours, ref, opt_ours, opt_ref = run_pair("sigma-grad", gamma=0.0, source="hyper")
    assert sum(layer.r for layer in ours.layer_list) == ours.budget < 6 * len(ours.layer_list)
    for name, layer in ours.adapted_layers.items():  # the cut states are the twin's kept rows / columns
        idx = kept_index(ref, name)
        with torch.no_grad():
            mine, theirs = layer.get_factors(), ref.adapted_layers[name].get_factors()
        for kind, dim in (("P", 1), ("lam", 0), ("Q", 0)):
            torch.testing.assert_close(mine[kind], theirs[kind].index_select(dim, idx), rtol=0, atol=1e-6)
    for i in range(FINAL + 1, TOTAL):
        a, _ = step(ours, opt_ours, i)
        b, _ = step(ref, opt_ref, i)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for (name, p), q in zip(ours.source.named_parameters(), ref.source.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(opt_ours.state[p]["exp_avg_sq"], opt_ref.state[q]["exp_avg_sq"], rtol=0, atol=1e-9)


def test_hyper_compacted_adapter_round_trips(tmp_path):
    ours, _, _, _ = run_pair("sigma-grad", source="hyper")
    ours.save_adapter(str(tmp_path / "h"))
    loaded = ha.load_adapter(tiny_bert(), str(tmp_path / "h"))
    assert loaded.ranks == ours.ranks
    ours.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**bert_batch(4)).logits, ours(**bert_batch(4)).logits, rtol=0, atol=0)


def test_task_loss_identical_and_regularizer_covers_kept_components():
    ours, ref, _, _ = run_pair("adalora", gamma=0.5)
    ours.train(), ref.train()
    with torch.no_grad():
        ours(**bert_batch(1)), ref(**bert_batch(1))
    assert abs(ours.last_task_loss - ref.last_task_loss) < 1e-6
    # peft's normalisation (mean of Frobenius norms over the 2n factors), on the kept columns / rows only.
    ps, qs = [], []
    for name, layer in ref.adapted_layers.items():
        idx = kept_index(ref, name)
        ps.append(layer.factors["P"].detach()[:, idx])
        qs.append(layer.factors["Q"].detach()[idx])
    expected = sum(torch.linalg.matrix_norm(p.T @ p - torch.eye(p.shape[1]), "fro") for p in ps)
    expected = expected + sum(torch.linalg.matrix_norm(q @ q.T - torch.eye(q.shape[0]), "fro") for q in qs)
    torch.testing.assert_close(ours.regularizer().detach(), expected / (2 * len(ps)), rtol=1e-6, atol=1e-6)
    assert orthogonality_penalty(ps, True, False).shape == (len(ps),)


def test_optimizer_state_shrinks_by_the_pruned_fraction():
    ours, ref, opt_ours, opt_ref = run_pair("sigma-grad")
    # AdamW keeps exp_avg and exp_avg_sq (fp32) per factor element; P, lam, Q hold r * (d_out + d_in + 1).
    kept = sum(2 * 4 * layer.r * (layer.out_features + layer.in_features + 1) for layer in ours.layer_list)
    full = sum(2 * 4 * 6 * (layer.out_features + layer.in_features + 1) for layer in ref.layer_list)
    assert optimizer_state_bytes(opt_ref) - optimizer_state_bytes(opt_ours) == full - kept
    assert kept / full == pytest.approx(2 / 6, abs=0.15)  # target_r / r of the state, up to module widths


@pytest.mark.parametrize("source", ["direct", "hyper"])
def test_rank_zero_module_runs_its_base_layer_and_trains(source):
    model = make("final", "sigma-grad", gamma=0.5, source=source)
    name, layer = next(iter(model.adapted_layers.items()))
    keeps = [torch.zeros(6, dtype=torch.bool) if n == name else torch.arange(6) < 3 for n in model.adapted_layers]
    opt = optimizer(model)
    model.compact_to(keeps, opt)
    with torch.no_grad():
        assert layer.r == 0 and layer.get_factors()["P"].shape == (layer.out_features, 0)
    x = torch.randn(2, 5, layer.in_features)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    model.train()
    for i in range(2):
        loss, _ = step(model, opt, i)
        assert torch.isfinite(loss)
    assert model.ranks[name] == 0 and sum(model.ranks.values()) == 3 * (len(keeps) - 1)


def test_save_load_round_trip_of_a_compacted_model(tmp_path):
    ours, _, _, _ = run_pair("adalora")
    ours.save_adapter(str(tmp_path / "a"))
    loaded = ha.load_adapter(tiny_bert(), str(tmp_path / "a"))
    assert loaded.ranks == ours.ranks and loaded.allocator.compacted
    assert {n: layer.r for n, layer in loaded.adapted_layers.items()} == ours.ranks
    ours.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**bert_batch(4)).logits, ours(**bert_batch(4)).logits, rtol=0, atol=0)


def test_resume_of_a_compacted_run_continues_identically(tmp_path):
    ours, _, opt, _ = run_pair("sigma-grad")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    folder = save_training_checkpoint(tmp_path, FINAL + 1, ours, opt, sched, {})
    fresh = make("final", "sigma-grad")
    fresh_opt = optimizer(fresh)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0)
    load_training_checkpoint(folder, fresh, fresh_opt, fresh_sched)
    assert fresh.ranks == ours.ranks
    ours.train(), fresh.train()
    for i in range(FINAL + 1, FINAL + 3):
        a, done = step(ours, opt, i)
        b, done_fresh = step(fresh, fresh_opt, i)
        assert not done and not done_fresh
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_export_of_a_compacted_model_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_bert()
    ours, _, _, _ = run_pair("adalora")
    ha.export_peft_lora(ours, tmp_path / "lora")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora"))
    ours.eval(), peft_model.eval()
    with torch.no_grad():
        batch = {k: v for k, v in bert_batch(6).items() if k != "labels"}
        torch.testing.assert_close(peft_model(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-6)


def test_config_default_off_and_hyper_refused():
    assert ha.AllocatorConfig(total_step=10).compact == "off"
    with pytest.raises(ValueError, match="compact"):
        ha.AllocatorConfig(total_step=10, compact="always")
    with pytest.raises(ValueError, match="arch='mlp'"):  # attention across rank components: not per token
        ha.AdapterConfig(method="adalora", source="hyper", allocator=ha.AllocatorConfig(total_step=10, compact="final"))
    model = make("off")
    assert model.compact() is False
    with pytest.raises(ValueError, match="compact='final'"):
        model.compact_to([torch.ones(6, dtype=torch.bool)] * len(model.layer_list))


def test_training_run_compacts_and_a_crashed_run_resumes_identically(tmp_path_factory, tmp_path):
    from test_resume import assert_same_run, crash_run
    from test_train_loop import rte_config, tiny_bert_dir, write_rte

    from hyperadalora.train import load_run, train

    root = tmp_path_factory.mktemp("compact-run")
    shared = {"bert": tiny_bert_dir(root), "data": write_rte(root / "data")}
    # The final budget is fixed at step index 3; the checkpoint after 4 steps holds a compacted model.
    overrides = ["steps=7", "eval_every=3", "save_every=2", "adapter.lora_dropout=0.1", "adapter.allocator.compact=final",
                 "adapter.allocator.total_step=7", "adapter.allocator.tinit=0", "adapter.allocator.tfinal=4"]
    ref = train(rte_config(shared, tmp_path, "run_name=ref", *overrides))
    assert ref.status == "completed"
    saved_modules = json.loads((ref.run_dir / "adapter" / "adapter_config.json").read_text())["modules"]
    assert 0 < sum(m["r"] for m in saved_modules.values()) < 12 * len(saved_modules)  # really compacted
    cfg = rte_config(shared, tmp_path, "run_name=run", *overrides)
    run = crash_run(shared, cfg, crash_step=6)
    result = train(load_run(run), resume=run)
    assert result.resumed_from_step == 4 and result.status == "completed"
    assert_same_run(run, ref.run_dir)


@pytest.mark.parametrize("source", ["direct", "hyper"])
def test_hand_written_loop_that_keeps_the_last_graph_alive_compacts(source):
    """``loss`` holds the last step's graph until the next forward has run, as in any plain loop.

    That graph keeps each factor's autograd accumulator alive; before the fix autograd reused it
    for the first forward after the cut and rejected the smaller gradient (regulariser on, so
    the factors also pass through ``torch.stack``). The twin without compaction is the reference
    up to the first forward after the cut; from then the regulariser covers the kept components
    only, so the trajectories part (as ``test_task_loss_identical_and_regularizer_covers_kept_components``
    states), and the later steps must only train.
    """
    base = tiny_bert()
    ours, ref = make("final", gamma=0.1, base=base, source=source), make("off", gamma=0.1, base=base, source=source)
    losses = {}
    for name, model in (("ours", ours), ("ref", ref)):
        opt, model_losses = optimizer(model), []
        model.train()
        for i in range(FINAL + 3):
            out = model(**bert_batch(i % 3))  # the previous step's ``out`` (and graph) is still alive here
            out.loss.backward()
            opt.step()
            model.after_step(i)
            model.compact(opt)
            opt.zero_grad(set_to_none=True)
            model_losses.append(model.last_task_loss)
        losses[name] = model_losses
    assert min(layer.r for layer in ours.adapted_layers.values()) < 6  # it did cut
    first_after_cut = FINAL + 1
    torch.testing.assert_close(losses["ours"][:first_after_cut + 1], losses["ref"][:first_after_cut + 1],
                               rtol=0, atol=1e-6)
    assert all(math.isfinite(x) for x in losses["ours"])
