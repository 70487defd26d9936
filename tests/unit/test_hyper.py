"""The hyper factor source: step-0 equality, symmetry breaking, gradients, modes, masks, calls."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import hyperadalora as ha
from hyperadalora.hyper.tokens import TokenLayout, from_rank_width, to_rank_width
from hyperadalora.methods import METHOD_REGISTRY, AdaLoRA, LoRA
from tiny_models import BERT_TARGETS, LLAMA_TARGETS, bert_batch, llama_batch, tiny_bert, tiny_llama, train_steps

METHODS = list(METHOD_REGISTRY)
SMALL_HYPER = dict(hidden=24, layers=1)


def cfg(method, source, **hyper):
    kw = dict(r=4)
    if method == "adalora":
        kw = dict(r=6, allocator=ha.AllocatorConfig(total_step=30, target_r=2, tinit=2, tfinal=6, deltaT=2))
    return ha.AdapterConfig(method=method, source=source, seed=7, target_modules=BERT_TARGETS,
                            modules_to_save=("classifier",), hyper=ha.HyperConfig(**{**SMALL_HYPER, **hyper}), **kw)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tokens", ["rank", "rows", "elements", "patch"])
def test_step0_equals_direct_twin(method, tokens):
    base = tiny_bert()
    direct = ha.wrap(copy.deepcopy(base), cfg(method, "direct"))
    hyper = ha.wrap(copy.deepcopy(base), cfg(method, "hyper", tokens=tokens))
    # Make the states non-trivial (same values in both) so the check is not 0 == 0.
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for i, (name, layer) in enumerate(direct.adapted_layers.items()):
            for kind, p in layer.factors.items():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for key, idx in hyper.hyper.groups.items():
            hyper.hyper.reset_state(key, torch.stack([direct.adapted_layers[list(direct.adapted_layers)[i]]
                                                      .factors[key[0]] for i in idx]))
    direct.train()
    hyper.train()
    batch = bert_batch(0)
    torch.testing.assert_close(hyper(**batch).loss, direct(**batch).loss, rtol=1e-6, atol=1e-7)


def test_hyper_states_start_as_direct_init():
    base = tiny_llama()
    c = ha.AdapterConfig(method="adalora", r=6, seed=3, target_modules=LLAMA_TARGETS,
                         allocator=ha.AllocatorConfig(total_step=10, target_r=2))
    direct = ha.wrap(copy.deepcopy(base), c)
    hyper = ha.wrap(copy.deepcopy(base), ha.AdapterConfig.from_dict({**c.to_dict(), "source": "hyper"}))
    names = list(direct.adapted_layers)
    for key, idx in hyper.hyper.groups.items():
        expected = torch.stack([direct.adapted_layers[names[i]].factors[key[0]].detach() for i in idx])
        assert torch.equal(hyper.hyper.state(key), expected)


@pytest.mark.parametrize("method,kind", [("adalora", "lam"), ("lora", "B")])
def test_zero_initialised_factors_differ_after_one_step(method, kind):
    m = ha.wrap(tiny_bert(), cfg(method, "hyper"))
    train_steps(m, 1)
    m.eval()
    with torch.no_grad():
        gen = torch.stack([layer.get_factors()[kind] for layer in m.adapted_layers.values()
                           if layer.get_factors()[kind].shape == next(iter(m.adapted_layers.values())).get_factors()[kind].shape])
    flat = gen.reshape(gen.shape[0], -1)
    assert flat.abs().max() > 0, "the zero factor must move"
    assert (flat[0] - flat[1]).abs().max() > 1e-6, "modules must get different values"
    per_component = gen if kind == "lam" else gen.transpose(1, 2)  # (n, r, ...)
    assert (per_component[:, 0] - per_component[:, 1]).abs().max() > 1e-6, "rank components must differ"


def test_without_context_the_symmetry_trap_appears():
    m = ha.wrap(tiny_bert(), cfg("adalora", "hyper", context=False))
    train_steps(m, 1)
    m.eval()
    with torch.no_grad():
        lam = torch.stack([layer.get_factors()["lam"] for layer in m.adapted_layers.values()])
    assert torch.allclose(lam, lam[0, 0].expand_as(lam)), "with no context every lam is generated alike"


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_every_hyper_parameter_and_no_state(method):
    m = ha.wrap(tiny_bert(), cfg(method, "hyper"))
    m.train()
    m(**bert_batch(0)).loss.backward()
    params = dict(m.hyper.named_parameters())
    # Output projections start at zero, and a factor multiplied by a zero factor (LoRA's A by
    # B = 0, AdaLoRA's P and Q by lam = 0) has no gradient at first; two steps in, every
    # hypernetwork parameter must receive gradient.
    opt = torch.optim.AdamW(m.hypernetwork_parameters(), lr=1e-3)
    for step in range(2):
        opt.step()
        m.after_step(step)
        opt.zero_grad()
        m(**bert_batch(step + 1)).loss.backward()
    missing = [n for n, p in params.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    for name, buf in m.hyper.named_buffers():
        assert not buf.requires_grad and buf.grad is None, name
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(n.startswith("source.") or ".classifier." in n or n.endswith(".magnitude") for n in trainable)


@pytest.mark.parametrize("mode", ["recurrent", "reparam"])
def test_recurrent_updates_states_reparam_keeps_them(mode):
    m = ha.wrap(tiny_bert(), cfg("lora", "hyper", mode=mode))
    before = {k: v.clone() for k, v in m.hyper.state_dict().items() if k.startswith("state_")}
    train_steps(m, 2)
    after = {k: v for k, v in m.hyper.state_dict().items() if k.startswith("state_")}
    changed = any(not torch.equal(before[k], after[k]) for k in before)
    assert changed == (mode == "recurrent")


def test_one_hypernetwork_call_per_kind_and_shape_group():
    m = ha.wrap(tiny_llama(), ha.AdapterConfig(method="adalora", r=6, source="hyper", target_modules=LLAMA_TARGETS,
                                               hyper=ha.HyperConfig(**SMALL_HYPER),
                                               allocator=ha.AllocatorConfig(total_step=10, target_r=2)))
    groups_per_kind = {}
    for kind, _ in m.hyper.groups:
        groups_per_kind[kind] = groups_per_kind.get(kind, 0) + 1
    # GQA: k/v projections (32 -> 16) differ from q/o (32 -> 32), gate/up (32 -> 40), down (40 -> 32).
    assert groups_per_kind["P"] == 3 and groups_per_kind["Q"] == 2 and groups_per_kind["lam"] == 1
    before = m.hyper.calls_per_kind()
    train_steps(m, 3, llama_batch)
    after = m.hyper.calls_per_kind()
    assert {k: after[k] - before[k] for k in after} == {k: 3 * v for k, v in groups_per_kind.items()}
    m.eval()
    with torch.no_grad():
        m(**llama_batch(0))
        m(**llama_batch(1))  # evaluation reuses one generation
    assert {k: m.hyper.calls_per_kind()[k] - after[k] for k in after} == groups_per_kind


@pytest.mark.parametrize("policy", ["adalora", "sigma-grad"])
def test_pruned_lam_stays_zero_in_forward_and_state(policy):
    alloc = ha.AllocatorConfig(total_step=24, target_r=2, tinit=2, tfinal=4, deltaT=2, policy=policy)
    m = ha.wrap(tiny_bert(), ha.AdapterConfig(method="adalora", r=6, source="hyper", allocator=alloc,
                                              target_modules=BERT_TARGETS, modules_to_save=("classifier",),
                                              hyper=ha.HyperConfig(**SMALL_HYPER)))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    m.train()
    prev = torch.zeros(len(m.adapted_layers), 6, dtype=torch.bool)
    for step in range(24):
        m(**bert_batch(step % 3)).loss.backward()
        opt.step()
        m.after_step(step)
        opt.zero_grad()
        pruned = m.allocator.masks() == 0
        assert not (prev & ~pruned).any(), "a pruned value came back"
        prev = pruned
        (key,) = [k for k in m.hyper.groups if k[0] == "lam"]
        assert torch.all(m.hyper.state(key)[pruned] == 0)
        with torch.no_grad():
            for i, layer in enumerate(m.adapted_layers.values()):
                a, _, _ = layer.method.effective_factors(layer, layer.get_factors())  # Q * (lam * mask)
                assert torch.all(a[pruned[i]] == 0)
    assert m.allocator.total_rank() == 2 * len(m.adapted_layers)


def test_save_load_continue_gives_same_next_losses(tmp_path):
    base = tiny_bert()
    c = cfg("adalora", "hyper")
    straight = ha.wrap(copy.deepcopy(base), c)
    train_steps(straight, 5)
    straight.save_adapter(tmp_path / "h")
    reloaded = ha.load_adapter(copy.deepcopy(base), tmp_path / "h")
    # Same state, fresh optimizers on both sides: the next losses must agree exactly.
    assert train_steps(straight, 4, start=5) == train_steps(reloaded, 4, start=5)


@pytest.mark.parametrize("preset", ["rank", "rows", "elements", "patch"])
@pytest.mark.parametrize("kind,shape", [("P", (37, 6)), ("Q", (6, 100)), ("lam", (6,)), ("B", (70, 4)),
                                        ("A", (4, 129))])
def test_cut_uncut_is_identity(preset, kind, shape):
    layout = TokenLayout.preset(preset, patch_width=16)
    x = torch.randn(3, *shape)
    axis = {**LoRA.rank_axes, **AdaLoRA.rank_axes}[kind]
    view = to_rank_width(x, axis)
    tokens = layout.cut(view)
    assert tokens.shape[1] == layout.num_tokens(*view.shape[1:])
    assert tokens.shape[2] == layout.token_dim(*view.shape[1:])
    assert torch.equal(from_rank_width(layout.uncut(tokens, *view.shape[1:]), axis, len(shape)), x)


def test_custom_spans_with_ragged_blocks():
    layout = TokenLayout(rank_span=4, width_span=7)  # 6 x 100 -> 2 x 15 blocks, both ragged
    x = torch.randn(2, 6, 100)
    tokens = layout.cut(x)
    assert tokens.shape == (2, 2 * 15, 28)
    assert torch.equal(layout.uncut(tokens, 6, 100), x)
    # The first token is the top-left 4 x 7 block, row-major.
    assert torch.equal(tokens[0, 0], x[0, :4, :7].reshape(-1))


def test_adapter_seed_fixes_the_hypernetworks_and_leaves_the_global_rng_alone():
    base = tiny_bert()
    torch.manual_seed(1)
    a = ha.wrap(copy.deepcopy(base), cfg("adalora", "hyper"))
    after_a = torch.rand(1)
    torch.manual_seed(1)
    torch.rand(5)  # a different global RNG state before the second wrap
    b = ha.wrap(copy.deepcopy(base), cfg("adalora", "hyper"))
    for (name, p), q in zip(a.hyper.named_parameters(), b.hyper.parameters()):
        assert torch.equal(p, q), name
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_a)  # wrap consumed nothing from the global generator
    unseeded = ha.wrap(copy.deepcopy(base), ha.AdapterConfig.from_dict({**cfg("adalora", "hyper").to_dict(), "seed": None}))
    assert not torch.equal(unseeded.hyper.nets["P"].in_proj["32"].weight, a.hyper.nets["P"].in_proj["32"].weight)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("source", ["direct", "hyper"])
def test_wrap_puts_every_tensor_on_the_models_device(method, source):
    """A model already on a GPU gets its hypernetworks there too (they are built on the CPU, for the
    seeded generator); ``meta`` stands in for the GPU this machine lacks. This failed on an H200
    before the hypernetworks were moved (benchmarks/gpu/scale_gpu.py: mat2 on cpu)."""
    config = dataclasses.replace(cfg(method, source, task_embeddings=2), seed=None)  # no generator on meta
    adapted = ha.wrap(tiny_bert().to("meta"), config)
    tensors = dict(adapted.named_parameters()) | dict(adapted.named_buffers())
    assert {name for name, t in tensors.items() if t.device.type != "meta"} == set()
    if source == "hyper":
        assert any(".nets." in name for name in tensors)
