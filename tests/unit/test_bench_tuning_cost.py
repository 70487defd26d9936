"""The tuning-cost analysis of the tuned results (issue 20 item 1), against hand computations."""

from __future__ import annotations

import pytest

from hyperadalora.bench.experiments.tuning_cost import expected_tries, render, rows_of


def test_expected_tries_of_a_random_order_search_without_replacement():
    # 3 lrs, 1 good: the good one is 1st, 2nd or 3rd with equal chance -> 2 tries on average.
    assert expected_tries(3, 1) == pytest.approx((1 + 2 + 3) / 3)
    # 4 lrs, 2 good: first good at try 1 (p 1/2), 2 (p 1/3), 3 (p 1/6) -> 5/3.
    assert expected_tries(4, 2) == pytest.approx(1 / 2 + 2 / 3 + 3 / 6)
    assert expected_tries(5, 5) == 1 and expected_tries(4, 0) is None


def summary(grid, window, cost, steps_mean, reached, n=3):
    return {"grid": grid, "good_lr_window": window, "step_ratio_to_adalora": cost, "n": n,
            "steps_to_target": {"mean": steps_mean, "reached": reached}}


def test_each_method_is_costed_against_adalora_on_their_common_ladder():
    result = {"name": "tuned_x", "config": {"task": "sst2", "model": "minilm", "steps": 200,
                                            "labels": {"adalora": "AdaLoRA", "hyperadalora": "HyperAdaLoRA"}},
              "summary": {"adalora": summary([1e-3, 3e-3, 1e-2], [3e-3], 1.0, 100.0, 3),
                          "hyperadalora": summary([3e-4, 1e-3, 3e-3], [1e-3, 3e-3], 1.5, 120.0, 2)}}
    (row,) = rows_of(result)
    assert row["ladder"] == 4 and row["window"] == [1e-3, 3e-3] and row["open"]  # 3e-3, its grid's top, is good
    assert not row["adalora"]["open"] and row["adalora"]["window"] == [3e-3]
    assert row["tries"] == pytest.approx(5 / 3) and row["adalora"]["tries"] == pytest.approx(5 / 2)
    hyper = (5 / 3 - 1) * 200 * 1.5 + 120 * 1.5  # failed tries run 200 steps, the good one to the target
    ada = (5 / 2 - 1) * 200 * 1.0 + 100 * 1.0
    assert row["random_search_steps"] == pytest.approx(hyper) and row["adalora"]["random_search_steps"] == ada
    assert row["random_search_ratio"] == pytest.approx(hyper / ada)
    assert row["grid_search_ratio"] == pytest.approx(1.5)  # every lr run to the end: the step cost ratio
    text = "\n".join(render({"config": {"results": ["tuned_x"]}, "rows": [row]}))
    assert f">= {hyper:.0f} / {ada:.0f}" in text  # 2 of 3 seeds reached: a lower bound
    assert "0.001, 0.003 (open)" in text


def test_a_method_that_never_reaches_the_target_has_no_search_cost():
    result = {"name": "t", "config": {"task": "rte", "model": "mpnet", "steps": 96,
                                      "labels": {"adalora": "AdaLoRA", "lora": "LoRA"}},
              "summary": {"adalora": summary([1e-3, 3e-3, 1e-2], [3e-3], 1.0, 70.0, 3),
                          "lora": summary([1e-3, 3e-3, 1e-2], [3e-3], 0.9, None, 0)}}
    (row,) = rows_of(result)
    assert row["random_search_steps"] is None and row["random_search_ratio"] is None
    assert row["grid_search_ratio"] == pytest.approx(0.9)
    assert "never / 166" in "\n".join(render({"config": {"results": ["t"]}, "rows": [row]}))


def test_a_result_read_on_the_held_out_loss_says_so():
    result = {"name": "t", "config": {"task": "alpaca", "model": "smollm2", "steps": 100, "target_measure": "held_out",
                                      "labels": {"adalora": "AdaLoRA", "hyperadalora": "HyperAdaLoRA"}},
              "summary": {"adalora": summary([1e-3, 3e-3], [3e-3], 1.0, 80.0, 1, n=2),
                          "hyperadalora": summary([1e-3, 3e-3], [1e-3], 1.4, 80.0, 2, n=2)}}
    (row,) = rows_of(result)
    assert row["measure"] == "held_out"
    assert "| alpaca / smollm2 (held-out) | HyperAdaLoRA |" in "\n".join(render({"config": {"results": ["t"]},
                                                                                 "rows": [row]}))
    plain = rows_of({**result, "config": {k: v for k, v in result["config"].items() if k != "target_measure"}})
    assert "| alpaca / smollm2 | HyperAdaLoRA |" in "\n".join(render({"config": {"results": ["t"]}, "rows": plain}))
