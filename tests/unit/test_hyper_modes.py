"""Hyper source: anchored mode, generation once per optimizer step, chunked bodies, lr groups."""

from __future__ import annotations

import copy

import pytest
import torch

import hyperadalora as ha
from tiny_models import bert_batch, tiny_bert
from test_hyper import cfg


def _randomise_out_proj(model, seed=0):
    """Non-zero output projections, so the generated residual is not zero at step 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in model.hyper.nets.values():
            for proj in net.out_proj.values():
                proj.weight.copy_(0.1 * torch.randn(proj.weight.shape, generator=g))


def _accumulated_step(model, micro_batches, opt):
    model.train()
    for b in micro_batches:
        (model(**bert_batch(b)).loss / len(micro_batches)).backward()
    model.backward_hypernetworks()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    model.after_step(0)
    opt.zero_grad()
    return grads


@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_per_step_generation_runs_once_and_matches_per_forward_gradients(method):
    base = tiny_bert()
    per_forward = ha.wrap(copy.deepcopy(base), cfg(method, "hyper"))
    per_step = ha.wrap(copy.deepcopy(base), cfg(method, "hyper", generate="per_step"))
    per_step.load_state_dict(per_forward.state_dict())
    _randomise_out_proj(per_forward)
    _randomise_out_proj(per_step)
    calls_before = sum(per_step.hyper.calls_per_kind().values())
    g_step = _accumulated_step(per_step, [0, 1, 2], torch.optim.SGD(per_step.parameters(), lr=0.0))
    g_fwd = _accumulated_step(per_forward, [0, 1, 2], torch.optim.SGD(per_forward.parameters(), lr=0.0))
    n_groups = len(per_step.hyper.groups)
    assert sum(per_step.hyper.calls_per_kind().values()) - calls_before == n_groups  # not 3 x groups
    assert set(g_step) == set(g_fwd) and any(n.startswith("source.nets.") for n in g_step)
    for name in g_fwd:
        torch.testing.assert_close(g_step[name], g_fwd[name], rtol=1e-5, atol=1e-7, msg=name)


def test_per_step_importance_uses_the_whole_accumulated_gradient():
    base = tiny_bert()
    m = ha.wrap(copy.deepcopy(base), cfg("adalora", "hyper", generate="per_step"))
    _randomise_out_proj(m)
    m.train()
    for b in (0, 1):
        m(**bert_batch(b)).loss.backward()
    key = next(k for k in m.hyper.groups if k[0] == "lam")
    # Reference: the sum of the two micro-batches' gradients of the same generated lam.
    ref = ha.wrap(copy.deepcopy(base), cfg("adalora", "hyper"))
    ref.load_state_dict(m.state_dict())
    ref.train()
    total = 0
    for b in (0, 1):
        ref(**bert_batch(b)).loss.backward()
        total = total + ref.hyper.generated[key].grad
    torch.testing.assert_close(m.hyper.gradients()[key], total, rtol=1e-5, atol=1e-8)


def test_per_step_without_backward_hypernetworks_raises_and_attach_optimizer_fixes_it():
    m = ha.wrap(tiny_bert(), cfg("lora", "hyper", generate="per_step"))
    opt = torch.optim.AdamW(m.optimizer_param_groups(1e-3))
    m.train()
    m(**bert_batch(0)).loss.backward()
    opt.step()
    with pytest.raises(RuntimeError, match="backward_hypernetworks"):
        m.after_step(0)
    m2 = ha.wrap(tiny_bert(), cfg("lora", "hyper", generate="per_step"))
    opt2 = torch.optim.AdamW(m2.optimizer_param_groups(1e-3))
    m2.attach_optimizer(opt2)
    before = [p.detach().clone() for p in m2.hypernetwork_parameters()]
    m2.train()
    m2(**bert_batch(0)).loss.backward()
    opt2.step()
    m2.after_step(0)
    assert any(not torch.equal(b, p) for b, p in zip(before, m2.hypernetwork_parameters()))


def test_anchored_mode_adds_the_residual_to_the_initial_state_and_tracks_it():
    m = ha.wrap(tiny_bert(), cfg("adalora", "hyper", mode="anchored"))
    _randomise_out_proj(m)
    initial = {k: m.hyper.state(k).clone() for k in m.hyper.groups}
    opt = torch.optim.AdamW(m.optimizer_param_groups(1e-2))
    m.train()
    for step in range(3):
        m(**bert_batch(step)).loss.backward()
        opt.step()
        generated = {k: t.detach().clone() for k, t in m.hyper.generated.items()}
        m.after_step(step)
        opt.zero_grad()
    for key in m.hyper.groups:
        assert torch.equal(m.hyper.anchor(key), initial[key])  # the anchor never moves
        mask = m.hyper.output_masks(key)
        expected = generated[key] * mask if mask is not None else generated[key]
        torch.testing.assert_close(m.hyper.state(key), expected)  # the state tracks F
        assert not torch.equal(m.hyper.state(key), initial[key])
    # Reference formula F = S0 + c * H(S) with the state as input, not F = S + c * H(S).
    key = next(k for k in m.hyper.groups if k[0] == "Q")
    with torch.no_grad():
        f = m.hyper.generate_group(key)
        recurrent_form = m.hyper.state(key) + (f - m.hyper.anchor(key))
    assert not torch.allclose(f, recurrent_form)
    torch.testing.assert_close(f - initial[key], recurrent_form - m.hyper.state(key))


@pytest.mark.parametrize("arch", ["attention", "mlp", "cnn"])
def test_chunked_body_equals_unchunked_in_values_and_gradients(arch):
    base = tiny_bert()
    whole = ha.wrap(copy.deepcopy(base), cfg("adalora", "hyper", tokens="elements", arch=arch,
                                              max_tokens_per_call=None))
    chunked = ha.wrap(copy.deepcopy(base), cfg("adalora", "hyper", tokens="elements", arch=arch,
                                                max_tokens_per_call=40))
    chunked.load_state_dict(whole.state_dict())
    _randomise_out_proj(whole)
    _randomise_out_proj(chunked)
    losses = []
    for m in (whole, chunked):
        m.train()
        loss = m(**bert_batch(0)).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-7)
    for (n, p), q in zip(whole.hyper.named_parameters(), chunked.hyper.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_lam_hidden_narrows_only_the_lam_hypernetwork_and_keeps_step0():
    base = tiny_bert()
    wide = ha.wrap(copy.deepcopy(base), cfg("adalora", "hyper"))
    narrow = ha.wrap(copy.deepcopy(base), cfg("adalora", "hyper", lam_hidden=8))
    nets = narrow.hyper.nets
    assert nets["lam"].body[0].qkv.in_features == 8 and nets["P"].body[0].qkv.in_features == 24
    assert nets["lam"].scale == pytest.approx(8 ** -0.5) and nets["Q"].scale == pytest.approx(24 ** -0.5)
    counts, wide_counts = narrow.hyper.parameter_counts(), wide.hyper.parameter_counts()
    assert counts["P"] == wide_counts["P"] and counts["lam"] < wide_counts["lam"]
    for m in (wide, narrow):
        m.train()
    batch = bert_batch(0)
    # Zero-initialised output projections: step 0 is the direct initialisation whatever the width.
    torch.testing.assert_close(narrow(**batch).loss, wide(**batch).loss, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="lam_hidden"):
        ha.HyperConfig(lam_hidden=0)


@pytest.mark.parametrize("generate", ["per_forward", "per_step"])
def test_checkpointing_gives_the_same_values_and_gradients(generate):
    base = tiny_bert()
    plain = ha.wrap(copy.deepcopy(base), cfg("adalora", "hyper", generate=generate))
    ckpt = ha.wrap(copy.deepcopy(base), cfg("adalora", "hyper", generate=generate, checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    _randomise_out_proj(plain)
    _randomise_out_proj(ckpt)
    g_plain = _accumulated_step(plain, [0, 1], torch.optim.SGD(plain.parameters(), lr=0.0))
    g_ckpt = _accumulated_step(ckpt, [0, 1], torch.optim.SGD(ckpt.parameters(), lr=0.0))
    assert set(g_plain) == set(g_ckpt) and any(n.startswith("source.nets.") for n in g_plain)
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)
    for key in plain.hyper.groups:  # the same next state (after_step copied the generated factors)
        torch.testing.assert_close(ckpt.hyper.state(key), plain.hyper.state(key))
    with pytest.raises(TypeError, match="checkpointing"):
        ha.HyperConfig(checkpointing="yes")


def test_param_groups_give_hypernetworks_their_own_learning_rate():
    m = ha.wrap(tiny_bert(), cfg("adalora", "hyper", lr=3e-5))
    groups = {g["name"]: g for g in m.optimizer_param_groups(1e-3, weight_decay=0.01)}
    assert groups["hypernetworks"]["lr"] == 3e-5 and groups["adapters_and_heads"]["lr"] == 1e-3
    hyper_ids = {id(p) for p in m.hyper.parameters()}
    assert {id(p) for p in groups["hypernetworks"]["params"]} == hyper_ids
    head = {id(p) for p in m.model.classifier.parameters()}
    assert head <= {id(p) for p in groups["adapters_and_heads"]["params"]}
    direct = ha.wrap(tiny_bert(), cfg("adalora", "direct"))
    assert [g["name"] for g in direct.optimizer_param_groups(1e-3)] == ["adapters_and_heads"]


def test_bad_hyper_settings_name_the_field():
    with pytest.raises(ValueError, match="generate"):
        ha.HyperConfig(generate="sometimes")
    with pytest.raises(ValueError, match="mode"):
        ha.HyperConfig(mode="integrate")
    with pytest.raises((ValueError, TypeError), match="max_tokens_per_call"):
        ha.HyperConfig(max_tokens_per_call=0)


def _tiny_mpnet():
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    return MPNetForSequenceClassification(MPNetConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


@pytest.mark.parametrize("family", ["mpnet", "llama"])
@pytest.mark.parametrize("method", ["lora", "adalora", "dora", "dylora"])
def test_hyper_trains_on_mpnet_and_gqa_llama(family, method):
    from tiny_models import LLAMA_TARGETS, llama_batch, tiny_llama

    if family == "mpnet":
        base, targets, batch_fn = _tiny_mpnet(), ["q", "k", "v", "o", "intermediate.dense", "output.dense"], bert_batch
    else:
        base, targets, batch_fn = tiny_llama(), LLAMA_TARGETS, llama_batch
    kw = dict(r=4)
    if method == "adalora":
        kw = dict(r=6, allocator=ha.AllocatorConfig(total_step=8, target_r=2, tinit=1, tfinal=2, deltaT=1))
    m = ha.wrap(base, ha.AdapterConfig(method=method, source="hyper", seed=1, target_modules=targets,
                                       # anchored: recurrent mode overshoots within 4 steps at this lr
                                       hyper=ha.HyperConfig(hidden=24, tokens="patch", patch_width=16,
                                                            mode="anchored"), **kw))
    shapes = {key[1] for key in m.hyper.groups}
    assert len(shapes) >= 3  # distinct shapes per kind (GQA's narrower k/v, FFN widths)
    opt = torch.optim.AdamW(m.optimizer_param_groups(3e-3))

    def eval_loss():  # eval mode: full rank for DyLoRA, whose training loss jumps with the sampled rank
        m.eval()
        with torch.no_grad():
            return m(**batch_fn(0)).loss.item()

    before = eval_loss()
    calls = sum(m.hyper.calls_per_kind().values())
    m.train()
    for step in range(4):
        m(**batch_fn(0)).loss.backward()
        opt.step()
        m.after_step(step)
        opt.zero_grad()
    assert sum(m.hyper.calls_per_kind().values()) - calls == 4 * len(m.hyper.groups)
    after = eval_loss()
    assert after < before, (before, after)


def test_deepcopy_of_a_hyper_model_is_independent():
    m = ha.wrap(tiny_bert(), cfg("adalora", "hyper"))
    _randomise_out_proj(m)
    twin = copy.deepcopy(m)
    m.eval(), twin.eval()
    with torch.no_grad():
        ref = m(**bert_batch(0)).logits
        torch.testing.assert_close(twin(**bert_batch(0)).logits, ref)
        for net in twin.hyper.nets.values():  # change only the copy's hypernetworks
            for proj in net.out_proj.values():
                proj.weight.mul_(3.0)
        twin.hyper.invalidate()
        assert not torch.allclose(twin(**bert_batch(0)).logits, ref)
        m.hyper.invalidate()
        torch.testing.assert_close(m(**bert_batch(0)).logits, ref)  # the original is untouched
