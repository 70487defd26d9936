"""Sensitivity-LoRA's arithmetic against hand computations (DESIGN.md section 1, policy ``sensitivity``)."""

import math

import pytest
import torch
from torch import nn

from hyperadalora.allocation.sensitivity_math import (InputSquareSums, MatrixSensitivity, allocate_ranks, combined_scores,
                                           cv_weight, matrix_sensitivity)


def test_hessian_diagonal_equals_the_diagonal_of_2_xt_x_over_real_tokens_only():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    x = torch.randn(2, 4, 5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    sums = InputSquareSums({"lin": layer})
    sums.set_token_mask(mask)
    layer(x)
    sums.remove()
    real = x[mask.bool()]  # (5 tokens, 5)
    hand = torch.diagonal(2 * real.t().double() @ real.double())  # diag of H = 2 X X^T, X = (d_in, tokens)
    torch.testing.assert_close(sums.hessian_diagonals()["lin"], hand)
    assert sums.tokens == 5


def test_calibration_hooks_leave_the_layer_unchanged_and_are_removed():
    layer = nn.Linear(4, 4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    sums = InputSquareSums({"lin": layer})
    layer(torch.randn(3, 4))
    sums.remove()
    layer(torch.randn(3, 4))  # a forward after removal adds nothing
    assert sums.hessian_diagonals()["lin"].shape == (4,)
    assert len(layer._forward_pre_hooks) == 0
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])


def test_metrics_per_channel_by_hand():
    m = matrix_sensitivity(torch.tensor([1.0, 4.0, 2.0, 3.0]))
    # sorted 4, 3, 2, 1: trace 10; top half mean (4 + 3) / 2; 85% of 10 = 8.5 needs 4 + 3 + 2 = 9 -> k = 3
    assert m == MatrixSensitivity(global_=10.0, topk=3.5, effective_rank=3.0)


def test_metrics_repeated_per_weight_by_hand():
    m = matrix_sensitivity(torch.tensor([1.0, 4.0, 2.0, 3.0]), d_out=3, diagonal="weight")
    # 4,4,4,3,3,3,2,2,2,1,1,1: trace 30; top 6 mean 3.5; 25.5 is first reached after 4*3+3*3+2*2 = 25 + 2 -> k = 9
    assert m == MatrixSensitivity(global_=30.0, topk=3.5, effective_rank=9.0)
    materialised = matrix_sensitivity(torch.tensor([1.0, 4.0, 2.0, 3.0]).repeat(3))
    assert m == materialised


def test_effective_rank_at_an_exact_boundary_and_topk_fraction():
    # alpha = 0.7 of 10 is exactly 4 + 3: k = 2 (>= alpha counts)
    assert matrix_sensitivity(torch.tensor([4.0, 3.0, 2.0, 1.0]), alpha=0.7).effective_rank == 2
    assert matrix_sensitivity(torch.tensor([4.0, 3.0, 2.0, 1.0]), topk_fraction=0.25).topk == 4.0
    with pytest.raises(ValueError, match="diagonal='row'"):
        matrix_sensitivity(torch.ones(3), diagonal="row")


def test_cv_weight_is_population_sigma_over_mean_squared():
    # values 1, 3: mean 2, population sigma 1 -> 1 / 4
    assert cv_weight([1.0, 3.0]) == pytest.approx(0.25)
    assert cv_weight([2.0, 2.0]) == 0.0
    assert cv_weight([0.0, 0.0]) == 0.0


def test_combined_scores_by_hand():
    metrics = {"a": MatrixSensitivity(10.0, 2.0, 3.0), "b": MatrixSensitivity(30.0, 4.0, 3.0)}
    b1 = 1.0 / 9.0  # S_T 2, 4: mean 3, sigma 1
    b2 = 0.0  # S_E equal
    s_l = {"a": b1 * 2.0, "b": b1 * 4.0}
    g1 = 10.0 / 400.0  # S_g 10, 30: mean 20, sigma 10
    mu_l, sigma_l = (s_l["a"] + s_l["b"]) / 2, abs(s_l["b"] - s_l["a"]) / 2
    g2 = sigma_l / mu_l**2
    want = {n: g1 * metrics[n].global_ + g2 * s_l[n] for n in metrics}
    got = combined_scores(metrics)
    assert b2 == 0.0
    assert got == pytest.approx(want)


def test_combined_scores_split_evenly_when_nothing_separates_the_matrices():
    same = MatrixSensitivity(5.0, 1.0, 2.0)
    assert combined_scores({"a": same, "b": same}) == {"a": 1.0, "b": 1.0}


def test_allocation_is_exact_with_largest_remainder_rounding():
    # shares 12 * (1, 2, 3) / 6 = 2, 4, 6 exactly; then 10 * (1, 1, 1) / 3 = 3.33 each -> one gets the extra
    assert allocate_ranks({"a": 1, "b": 2, "c": 3}, 12, {"a": 9, "b": 9, "c": 9}) == {"a": 2, "b": 4, "c": 6}
    assert allocate_ranks({"a": 1, "b": 1, "c": 1}, 10, {"a": 9, "b": 9, "c": 9}) == {"a": 4, "b": 3, "c": 3}
    # 7 * (0.1, 0.45, 0.45) = 0.7, 3.15, 3.15: floor at 1 fixes a, 6 left split 3 / 3
    assert allocate_ranks({"a": 0.1, "b": 0.45, "c": 0.45}, 7, {"a": 9, "b": 9, "c": 9}) == {"a": 1, "b": 3, "c": 3}


def test_allocation_caps_and_redistributes():
    # 1.2, 2.4, 8.4: c capped at 5, 7 left split 1:2 -> 2.33, 4.67 -> 2, 5 by largest remainder
    ranks = allocate_ranks({"a": 1, "b": 2, "c": 7}, 12, {"a": 8, "b": 8, "c": 5})
    assert ranks == {"a": 2, "b": 5, "c": 5}


def test_allocation_lets_a_matrix_drop_out_only_when_allowed():
    scores = {"a": 0.01, "b": 1.0, "c": 1.0}
    assert allocate_ranks(scores, 8, {n: 8 for n in scores}, min_rank=0) == {"a": 0, "b": 4, "c": 4}
    assert allocate_ranks(scores, 8, {n: 8 for n in scores}, min_rank=1)["a"] == 1


@pytest.mark.parametrize("total", [2, 25])
def test_allocation_refuses_an_infeasible_total_naming_the_range(total):
    with pytest.raises(ValueError, match="possible totals are 3..24"):
        allocate_ranks({"a": 1, "b": 1, "c": 1}, total, {"a": 8, "b": 8, "c": 8})


def test_allocation_totals_are_exact_on_random_scores():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(2, 12, (1,), generator=gen))
        scores = {f"m{i}": float(v) for i, v in enumerate(torch.rand(n, generator=gen) ** 3)}
        caps = {name: int(torch.randint(2, 16, (1,), generator=gen)) for name in scores}
        total = int(torch.randint(n, sum(caps.values()) + 1, (1,), generator=gen))
        ranks = allocate_ranks(scores, total, caps)
        assert sum(ranks.values()) == total
        assert all(1 <= ranks[k] <= caps[k] for k in ranks)
        assert not math.isnan(sum(ranks.values()))


def test_parameter_budget_by_hand():
    # costs 2 and 6 per rank, budget 16: shares 8 / 8 -> ranks 4 and 1.33 -> floors 4, 1 (14 used);
    # 2 left: b's remainder comes first but a rank of b costs 6, a rank of a (2) still fits.
    costs = {"a": 2, "b": 6}
    ranks = allocate_ranks({"a": 1, "b": 1}, 16, {"a": 9, "b": 9}, costs=costs)
    assert ranks == {"a": 5, "b": 1}
    # 3:1 scores, budget 24: shares 18 / 6 -> ranks 9 and 1 exactly, nothing left over
    assert allocate_ranks({"a": 3, "b": 1}, 24, {"a": 9, "b": 9}, costs=costs) == {"a": 9, "b": 1}


def test_unit_costs_are_the_rank_budget():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        scores = {f"m{i}": float(v) for i, v in enumerate(torch.rand(6, generator=gen))}
        caps = {n: 12 for n in scores}
        assert allocate_ranks(scores, 30, caps, costs={n: 1 for n in scores}) == allocate_ranks(scores, 30, caps)


def test_parameter_budget_is_never_exceeded_and_nearly_spent_on_random_scores():
    gen = torch.Generator().manual_seed(2)
    for _ in range(50):
        n = int(torch.randint(2, 10, (1,), generator=gen))
        scores = {f"m{i}": float(v) for i, v in enumerate(torch.rand(n, generator=gen) ** 3)}
        costs = {name: int(torch.randint(3, 40, (1,), generator=gen)) for name in scores}
        caps = {name: int(torch.randint(2, 16, (1,), generator=gen)) for name in scores}
        budget = int(torch.randint(sum(costs.values()), sum(caps[k] * costs[k] for k in caps) + 1, (1,),
                                   generator=gen))
        ranks = allocate_ranks(scores, budget, caps, costs=costs)
        spent = sum(ranks[k] * costs[k] for k in ranks)
        assert spent <= budget and all(1 <= ranks[k] <= caps[k] for k in ranks)
        growable = [costs[k] for k in ranks if ranks[k] < caps[k]]
        # What is left cannot buy one more rank of every matrix below its cap (floors alone leave up to
        # sum(costs)); with every matrix at its cap the budget is spent exactly.
        assert budget - spent < max(growable) if growable else spent == budget


def test_parameter_budget_refuses_an_infeasible_total_naming_the_cost_range():
    with pytest.raises(ValueError, match="total cost of 5 .* possible totals are 12..48"):
        allocate_ranks({"a": 1, "b": 1}, 5, {"a": 4, "b": 4}, costs={"a": 2, "b": 10})
