"""``bench compaction_terms``: the terms it times do AdaLoRA's work, and its table's arithmetic.

References: the gradient of ``sum(Q * lam)`` by hand (``dlam_i = sum_j Q_ij``, ``dQ_ij = lam_i``),
the regulariser's gradient from :func:`orthogonality_penalty` itself, and the table's differences,
shares and ratios computed by hand from a made-up result.
"""

from __future__ import annotations

import copy

import pytest
import torch

import hyperadalora as ha
from hyperadalora.bench.experiments import compaction_terms as ct
from hyperadalora.methods.adalora import orthogonality_penalty
from tiny_models import BERT_TARGETS, bert_batch, tiny_bert


def compacted_tiny(gamma: float = 0.5):
    """A tiny AdaLoRA compacted at its final budget (step 2 of 4), then past it."""
    alloc = ha.AllocatorConfig(total_step=4, target_r=2, tinit=0, tfinal=2, deltaT=1, compact="final")
    model = ha.wrap(tiny_bert(), ha.AdapterConfig(method="adalora", r=4, lora_alpha=8, seed=0, gamma=gamma,
                                                   target_modules=BERT_TARGETS, allocator=alloc))
    step = ct.phased_step(model, ct.CLOCKS["wall"])
    phases = [step(bert_batch(i % 3), i) for i in range(3)]
    assert model.allocator.compacted
    return model, phases


def test_phased_step_times_three_phases_and_trains():
    model, phases = compacted_tiny()
    assert all(set(p) == set(ct.PHASES) and min(p.values()) >= 0 for p in phases)
    assert all(p.grad is None for p in model.parameters())  # the update phase zeroes the gradients


def test_lam_products_term_leaves_the_gradients_of_sum_q_times_lam():
    model, _ = compacted_tiny()
    ct.lam_products_term(model)
    for layer in model.layer_list:
        if layer.r == 0:
            continue
        f = layer.factors
        torch.testing.assert_close(f["lam"].grad, f["Q"].detach().sum(dim=1))
        torch.testing.assert_close(f["Q"].grad, f["lam"].detach()[:, None].expand_as(f["Q"]))
        assert f["P"].grad is None  # P is not part of the product


def test_regularizer_term_gradient_is_gamma_times_the_penalty_gradient():
    model, _ = compacted_tiny(gamma=0.5)
    reference = copy.deepcopy(model)
    ct.regularizer_term(model)
    layers = list(reference.layer_list)
    ps = [layer.factors["P"] for layer in layers]
    qs = [layer.factors["Q"] for layer in layers]
    pen = orthogonality_penalty(ps, True, False).sum() \
        + orthogonality_penalty(qs, False, False).sum()
    (0.5 * pen / (2 * len(layers))).backward()
    for ours, ref in zip(model.layer_list, layers):
        torch.testing.assert_close(ours.factors["P"].grad, ref.factors["P"].grad)
        torch.testing.assert_close(ours.factors["Q"].grad, ref.factors["Q"].grad)


def test_time_term_clears_what_the_term_leaves():
    model, _ = compacted_tiny()
    ct.time_term(ct.regularizer_term, model, 2, ct.CLOCKS["wall"])
    assert all(p.grad is None for p in model.parameters())


def test_attribution_rows_by_hand():
    lora = {"forward": [1.0, 2.0], "backward": [2.0, 2.0], "update": [0.1, 0.1]}
    compact = {"forward": [1.1, 2.3], "backward": [2.0, 1.8], "update": [0.1, 0.3]}
    m = {"model": "m", "phases_s": {"adalora_compact": compact, "lora_same_ranks": lora},
         "terms_s": {"regularizer": [0.031, 0.031], "lam_products": [0.0031, 0.0031]}}
    rows = {r[1]: r for r in ct.attribution_rows(m)}
    # LoRA steps 3.1 and 4.1 s (mean 3.6); compact steps 3.2 and 4.4: differences 0.1 and 0.3 s.
    assert rows["step"][2:4] == ["3800.0", "3600.0"]
    assert rows["step"][4].startswith("200.0 [")
    assert rows["step"][5].startswith(f"{100 * 0.2 / 3.6:.2f} [")
    assert rows["step"][6].startswith(f"{(3.2 / 3.1 + 4.4 / 4.1) / 2:.3f} [")
    assert rows["forward"][4].startswith("200.0 [")  # 0.1 and 0.3 s
    assert rows["backward"][4].startswith("-100.0 [")
    assert rows["regularizer (alone)"][2] == "31.0"
    assert rows["regularizer (alone)"][5] == f"{100 * 0.031 / 3.6:.2f} [{100 * 0.031 / 3.6:.2f}, {100 * 0.031 / 3.6:.2f}]"


def test_options_refuse_one_round_and_unknown_models():
    with pytest.raises(SystemExit):
        ct.parse_args(["--steps", "1"])
    with pytest.raises(SystemExit):
        ct.parse_args(["--models", "minilm,gpt5"])
