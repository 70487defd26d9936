"""The transfer experiment's pure parts: the paired comparison and the run specs."""

from __future__ import annotations

import math
import statistics

import pytest

from hyperadalora.bench.experiments import transfer


def test_paired_steps_matches_a_hand_computed_t_test_with_censoring():
    # ours never reaches it on the third seed: censored at budget + 1 = 41
    got = transfer.paired_steps([10, 20, None], [20, 20, 30], budget=40)
    diffs = [10 - 20, 20 - 20, 41 - 30]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    se = sd / math.sqrt(3)
    t = mean / se
    # Student t with 2 degrees of freedom has closed forms: two-sided p = 1 - |t| / sqrt(t^2 + 2),
    # and the q-quantile is (2q - 1) / sqrt(2q(1 - q)) (4.3027 at q = 0.975, as the tables give).
    assert got["p_value"] == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2), rel=1e-9)
    quantile = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)
    assert quantile == pytest.approx(4.3027, abs=1e-4)
    half = quantile * se
    assert got["diff_ci"] == pytest.approx([mean - half, mean + half], rel=1e-9)
    assert got["mean_ratio"] == pytest.approx((10 / 20 + 20 / 20 + 41 / 30) / 3)
    assert got["never"] == 1 and got["diff_mean"] == pytest.approx(1 / 3)


def test_identical_arms_have_no_p_value():
    assert transfer.paired_steps([5, 6], [5, 6], budget=10)["p_value"] is None


def test_started_arms_point_at_their_own_methods_source_run():
    sources = {"adalora-from-cola": {"run_dir": "/s/ada"}, "hyperadalora-from-cola": {"run_dir": "/s/hyp"},
               "hyperadalora-from-cola+mrpc": {"run_dir": "/s/mt", "extra": {"adapter.hyper.task_embeddings": 1}}}
    assert transfer.arms("cola") == ("adalora-from-cola", "hyperadalora-from-cola", "adalora", "hyperadalora")
    assert transfer.arms("cola", "cola,mrpc") == ("adalora-from-cola", "hyperadalora-from-cola",
                                                 "hyperadalora-from-cola+mrpc", "adalora", "hyperadalora")
    spec = transfer.target_spec("hyperadalora-from-cola", "sst2", 1e-3, 2, sources)
    assert spec.overrides["adapter.init_from"] == "/s/hyp" and spec.overrides["adapter.source"] == "hyper"
    assert spec.overrides["task"] == "sst2" and spec.overrides["seed"] == 2
    assert "adapter.hyper.task_embeddings" not in spec.overrides
    multi = transfer.target_spec("hyperadalora-from-cola+mrpc", "sst2", 1e-3, 2, sources)
    assert multi.overrides["adapter.init_from"] == "/s/mt" and multi.overrides["adapter.hyper.task_embeddings"] == 1
    scratch = transfer.target_spec("adalora", "sst2", 1e-3, 2, sources)
    assert "adapter.init_from" not in scratch.overrides and scratch.key == "sst2-minilm-adalora-lr0.001-s2"
    source = transfer.source_spec("cola", "hyperadalora")
    assert source.keep_run_dir and source.overrides["task"] == "cola"


def test_adopt_cached_takes_only_results_of_the_same_config(tmp_path):
    from hyperadalora.bench.runner import adopt_cached, load_cached, spec_config
    from hyperadalora.fileio import write_json

    sources = {"adalora-from-cola": {"run_dir": "/s/ada"}, "hyperadalora-from-cola": {"run_dir": "/s/hyp"}}
    same = transfer.target_spec("adalora", "sst2", 1e-3, 0, sources)
    other = transfer.target_spec("adalora", "sst2", 3e-3, 0, sources)
    (tmp_path / "theirs").mkdir()
    write_json(tmp_path / "theirs" / f"{same.key}.json", {"key": same.key, "config": spec_config(same), "losses": [1.0]})
    stale = {**spec_config(other), "lr": 5e-3}  # made with another lr than the spec now resolves to
    write_json(tmp_path / "theirs" / f"{other.key}.json", {"key": other.key, "config": stale, "losses": [2.0]})
    assert adopt_cached([same, other], tmp_path / "theirs", tmp_path / "ours") == [same.key]
    assert load_cached(same, tmp_path / "ours")["losses"] == [1.0] and load_cached(other, tmp_path / "ours") is None



def test_where_a_run_reports_or_exports_does_not_make_its_cache_stale():
    """report_to / export (added after these runs were cached) change no result: a cached run stays valid."""
    from hyperadalora.bench.runner import config_differences, spec_config

    spec = transfer.target_spec("adalora", "sst2", 1e-3, 0, {})
    current = spec_config(spec)
    cached = {k: v for k, v in current.items() if k not in ("report_to", "export")}
    assert config_differences(cached, current) == []
    assert config_differences({**cached, "lr": 5e-3}, current) == ["lr"]


def test_a_multitask_source_that_has_not_run_is_named_in_report_only_mode(tmp_path):
    args = transfer.parse_args(["--multitask", "cola,mrpc", "--report-only", "--work-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"source-multitask-cola\+mrpc-minilm-hyperadalora-s0 has not run"):
        transfer.multitask_source(args)
    with pytest.raises(SystemExit):
        transfer.parse_args(["--multitask", "sst2,cola"])  # the target among the sources
