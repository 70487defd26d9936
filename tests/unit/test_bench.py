"""The benchmark machinery: curve math against hand computations, cached runs of the real loop,
and ``hyperadalora bench`` dispatch."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from hyperadalora.bench.curves import best_lr, first_reach, mean_and_spread, mean_or_none, smoothed_final
from hyperadalora.bench.runner import RunSpec, config_differences, run_specs
from hyperadalora.cli import main as cli_main

from test_train_loop import read_jsonl, tiny_bert_dir, tiny_llama_dir, write_instruct, write_rte


def ema(values, beta=0.9):
    """Bias-corrected EMA written out by hand."""
    out, avg = [], 0.0
    for n, x in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * x
        out.append(avg / (1 - beta ** n))
    return out


def test_first_reach_counts_steps_and_sums_seconds_on_the_smoothed_curve():
    losses = [1.0, 0.8, 0.6, 0.4, 0.2]
    times = [0.5, 1.0, 1.5, 2.0, 2.5]
    sm = ema(losses)  # 1.0, 0.8947, 0.7786, ...
    target = sm[2]
    assert first_reach(losses, times, target) == (3, pytest.approx(3.0))
    # A raw value below the target does not count while the smoothed one is above it.
    assert first_reach([1.0, 0.0, 1.0], [1, 1, 1], 0.3) == (None, None)
    assert first_reach([1.0, 0.0], [1, 1], ema([1.0, 0.0])[1]) == (2, 2)
    with pytest.raises(ValueError, match="step times"):
        first_reach([1.0, 0.5], [1.0], 0.1)
    # Without step times (a curve imported from a result that kept only its losses): the steps, no seconds.
    assert first_reach(losses, None, target) == (3, None)
    assert first_reach([1.0, 0.0, 1.0], None, 0.3) == (None, None)


def test_smoothed_final_and_best_lr_never_pick_a_diverged_run():
    assert smoothed_final([0.7, 0.5, 0.3]) == pytest.approx(ema([0.7, 0.5, 0.3])[-1])
    assert smoothed_final([]) == math.inf
    curves = [{"lr": 1e-3, "losses": [0.6, 0.5]}, {"lr": 1e-3, "losses": [0.6, 0.3]},  # mean of two seeds
              {"lr": 3e-3, "losses": [0.6, 0.1], "diverged": True}, {"lr": 1e-4, "losses": [0.6, 0.45]}]
    means = {1e-3: (ema([0.6, 0.5])[-1] + ema([0.6, 0.3])[-1]) / 2, 1e-4: ema([0.6, 0.45])[-1]}
    assert best_lr(curves) == min(means, key=means.get)
    assert best_lr([{"lr": 1e-3, "losses": [1.0], "diverged": True}]) is None
    assert best_lr([]) is None


def test_mean_and_spread_over_seeds():
    mean, low, high = mean_and_spread([[1, 2, 3], [3, 4], [2, 0, 9]])
    assert mean == [2, 2] and low == [1, 0] and high == [3, 4]
    assert mean_or_none([1, 3]) == 2 and mean_or_none([1, None]) is None and mean_or_none([]) is None


def test_run_spec_key_must_be_a_file_name():
    with pytest.raises(ValueError, match="file name"):
        RunSpec(key="a/b", config={})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return {"bert": tiny_bert_dir(root), "data": write_rte(root / "data")}


def tiny_spec(tiny, key, **extra):
    overrides = {"model": str(tiny["bert"]), "steps": 4, "batch_size": 4, "adapter.target_modules": ["query", "value"],
                 "adapter.allocator.deltaT": 1, "adapter.allocator.target_r": 4, **extra}
    return RunSpec(key=key, config="rte_minilm_adalora", overrides=overrides, tags={"method": "adalora"})


def test_run_specs_runs_the_real_loop_caches_and_resumes(tiny, tmp_path):
    cache = tmp_path / "cache"
    specs = [tiny_spec(tiny, "a"), tiny_spec(tiny, "b", **{"adapter.source": "hyper"})]
    first = run_specs(specs, cache, str(tiny["data"]))
    for key in ("a", "b"):
        r = first[key]
        assert r["status"] == "completed" and len(r["losses"]) == 4 and len(r["step_times"]) == 4
        assert r["final_smoothed"] == pytest.approx(ema(r["losses"])[-1])
        assert 0.0 <= r["final_metrics"]["accuracy"] <= 1.0
        assert json.loads((cache / f"{key}.json").read_text())["losses"] == r["losses"]
        assert not (cache / "runs" / key).exists()  # run directories are dropped unless kept
    # The same losses as the training loop reports in its own log (one run of the CLI path).
    cached = run_specs(specs, cache, str(tiny["data"]), only_cached=True)
    assert cached["a"]["losses"] == first["a"]["losses"]
    # A cached spec is not run again: its file is left untouched.
    stamp = (cache / "a.json").stat().st_mtime_ns
    again = run_specs(specs + [tiny_spec(tiny, "c", eval_loss_every=2)], cache,
                      str(tiny["data"]))
    assert (cache / "a.json").stat().st_mtime_ns == stamp and set(again) == {"a", "b", "c"}
    # The held-out curve is cached as [step, loss] pairs (every 2 steps; the last is step 4), else None.
    assert [s for s, _ in again["c"]["eval_losses"]] == [2, 4] and first["a"]["eval_losses"] is None
    assert all(isinstance(v, float) and v > 0 for _, v in again["c"]["eval_losses"])
    with pytest.raises(ValueError, match="share the key"):
        run_specs([specs[0], specs[0]], cache, None)


def test_kept_run_dir_is_rerun_when_it_was_removed(tiny, tmp_path):
    import shutil

    spec = dataclasses.replace(tiny_spec(tiny, "kept"), keep_run_dir=True)
    res = run_specs([spec], tmp_path, str(tiny["data"]))["kept"]
    assert (tmp_path / "runs" / "kept" / "adapter" / "adapter_config.json").is_file()
    shutil.rmtree(tmp_path / "runs" / "kept")
    assert run_specs([spec], tmp_path, str(tiny["data"]), only_cached=True) == {}
    assert run_specs([spec], tmp_path, str(tiny["data"]))["kept"]["losses"] == res["losses"]  # same seed, same run


def test_a_calibrated_run_keeps_its_calibration_record_in_the_cache(tiny, tmp_path):
    # Sensitivity-LoRA decides its ranks before the wrap: the cache keeps what allocation.json said
    # (the run directory itself is dropped), so a benchmark can report the calibration seconds.
    spec = dataclasses.replace(tiny_spec(tiny, "sens", **{"adapter.allocator.policy": "sensitivity"}),
                               keep_run_dir=True)
    res = run_specs([spec], tmp_path, str(tiny["data"]))["sens"]
    record = json.loads((tmp_path / "runs" / "sens" / "allocation.json").read_text())
    assert res["allocation"] == {k: record[k] for k in ("policy", "rows", "tokens", "seconds", "total_rank", "ranks")}
    assert res["allocation"]["policy"] == "sensitivity" and res["allocation"]["seconds"] > 0
    assert "allocation" not in run_specs([tiny_spec(tiny, "plain")], tmp_path, str(tiny["data"]))["plain"]


def test_in_processes_runs_every_call_in_spawned_workers_and_keeps_the_indices():
    import operator
    import os

    from hyperadalora.bench.runner import in_processes

    calls = [(2, 3), (3, 2), (5, 0), (7, 1)]
    assert dict(in_processes(operator.pow, calls, workers=2)) == {0: 8, 1: 9, 2: 1, 3: 7}
    assert list(in_processes(operator.pow, calls, workers=1)) == [(0, 8), (1, 9), (2, 1), (3, 7)]  # in order
    pids = {pid for _, pid in in_processes(os.getpid, [()] * 4, workers=2)}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert list(in_processes(os.getpid, [()], workers=1)) == [(0, os.getpid())]


def test_humaneval_many_scores_a_kept_run_like_evaluate_run_and_caches_it(tmp_path):
    from hyperadalora.bench.humaneval import HUMANEVAL_OVERRIDES, humaneval_many
    from hyperadalora.train import load_run_config
    from hyperadalora.train import evaluate_run, load_run, train

    data = write_instruct(tmp_path / "data")
    cfg = load_run_config("gsm8k_smollm2_adalora", [
        f"model={tiny_llama_dir(tmp_path)}", f"data_dir={data}", f"output_dir={tmp_path}", "run_name=run",
        "steps=2", "batch_size=2", "max_length=64", "eval_every=0", "eval_rows=1", "max_new_tokens=2",
        "progress=false", "adapter.target_modules=[q_proj,v_proj]"])
    run_dir = train(cfg).run_dir
    cache = tmp_path / "he"
    got = humaneval_many({"run": run_dir}, cache, rows=2, data_dir=str(data), threads=None)["run"]
    # The same evaluation written out by hand: the run's config with the benchmark's HumanEval settings.
    ref = evaluate_run(load_run(run_dir, [*HUMANEVAL_OVERRIDES, "eval_rows=2", f"data_dir={data}"]),
                       adapter_dir=run_dir / "adapter", out=tmp_path / "ref.json")
    assert got["num_examples"] == 2 and got["metrics"]["pass@1"] == ref["metrics"]["pass@1"]
    assert got["adapter"] == str(run_dir / "adapter")
    completions = [p["completion"] for p in read_jsonl(cache / "run.predictions.jsonl")]
    assert completions == [p["completion"] for p in read_jsonl(tmp_path / "ref.predictions.jsonl")]
    # Cached: not evaluated again; a job without a result is skipped when only reading the cache.
    stamp = (cache / "run.json").stat().st_mtime_ns
    again = humaneval_many({"run": run_dir, "other": run_dir}, cache, rows=2, data_dir=None, only_cached=True)
    assert set(again) == {"run"} and again["run"] == got and (cache / "run.json").stat().st_mtime_ns == stamp


def test_config_differences_by_hand():
    cached = {"lr": 0.001, "threads": 1, "adapter": {"r": 12, "hyper": {"hidden": 312}}}
    assert config_differences(cached, {"lr": 0.001, "threads": 2, "adapter": {"r": 12, "hyper": {"hidden": 312}}}) == []
    # A field added after the run (off by default) is the old behaviour; one that is on is not.
    now = {"lr": 0.001, "threads": 1, "adapter": {"r": 12, "hyper": {"hidden": 312, "lam_hidden": None,
                                                                    "checkpointing": False}}}
    assert config_differences(cached, now) == []
    now["adapter"]["hyper"]["lam_hidden"] = 64
    now["lr"] = 0.003
    assert config_differences(cached, now) == ["adapter.hyper.lam_hidden", "lr"]


def test_a_cached_run_with_another_config_runs_again(tiny, tmp_path, capsys):
    spec = tiny_spec(tiny, "s")
    first = run_specs([spec], tmp_path, str(tiny["data"]))["s"]
    # The same key, but the spec now resolves to another config (a changed default would do this).
    changed = dataclasses.replace(spec, overrides={**spec.overrides, "adapter.gamma": 0.25})
    assert run_specs([changed], tmp_path, str(tiny["data"]), only_cached=True) == {}
    assert "adapter.gamma" in capsys.readouterr().err
    again = run_specs([changed], tmp_path, str(tiny["data"]))["s"]
    assert again["config"]["adapter"]["gamma"] == 0.25 and first["config"]["adapter"]["gamma"] != 0.25
    assert run_specs([changed], tmp_path, str(tiny["data"]), only_cached=True)["s"]["losses"] == again["losses"]


def test_bench_command_lists_runs_and_refuses(monkeypatch, capsys):
    from hyperadalora.bench import registry

    assert cli_main(["bench"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in registry.registered())
    assert cli_main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    # A registered experiment gets the options after its name; its exit status comes back.
    seen = []
    fake = dataclasses.replace(registry.get("gamma_sweep"), name="fake", main=lambda argv: seen.append(argv) or 3)
    monkeypatch.setitem(registry.EXPERIMENTS, "fake", fake)
    assert cli_main(["bench", "fake", "--quick", "--workers", "1"]) == 3
    assert seen == [["--quick", "--workers", "1"]]


def test_step_cost_variant_overrides_parse_to_hyper_config_values():
    from hyperadalora.bench.experiments.step_model import direct_twin, parse_variant

    assert parse_variant("adalora") == ("adalora", {})
    name, over = parse_variant("hyper_adalora_mlp_rank+lam_hidden=64+checkpointing=True+output_scale=1e-2+lr=None")
    assert name == "hyper_adalora_mlp_rank"
    assert over == {"lam_hidden": 64, "checkpointing": True, "output_scale": 0.01, "lr": None}
    assert type(over["lam_hidden"]) is int
    with pytest.raises(ValueError, match="key=value"):
        parse_variant("hyper_adalora+lam_hidden")
    with pytest.raises(ValueError, match="unknown config field 'adapter.hyper.hiden'"):
        parse_variant("hyper_adalora+hiden=3")
    assert direct_twin("hyper_dora_mlp_rank+hidden=128") == "dora" and direct_twin("peft_lora") is None


def test_publish_inlines_result_tables_between_markers(tmp_path):
    from hyperadalora.bench.experiments import publish

    (tmp_path / "a.md").write_text("| x |\n|---|\n| 1 |\n")
    text = "intro\n<!-- table:a -->\nold\n<!-- end:a -->\nmid\n<!-- table:b -->\nkeep\n<!-- end:b -->\n"
    new, missing = publish.publish(text, tmp_path)
    assert new == "intro\n<!-- table:a -->\n| x |\n|---|\n| 1 |\n<!-- end:a -->\nmid\n<!-- table:b -->\nkeep\n<!-- end:b -->\n"
    assert missing == ["b"]
    assert publish.publish(new, tmp_path)[0] == new  # idempotent


def test_convergence_mpnet_options_parse_and_refuse_tasks_not_run_on_mpnet():
    import argparse

    from hyperadalora.bench.experiments import convergence as conv

    parser = argparse.ArgumentParser()
    assert conv.parse_mpnet_seeds("2", ["sst2", "rte"], parser) == {"sst2": 2, "rte": 2}
    assert conv.parse_mpnet_seeds("rte:3", ["sst2", "rte"], parser) == {"sst2": 1, "rte": 3}
    assert conv.parse_mpnet_seeds("rte:3", ["sst2", "rte"], parser, "--mpnet-paper-seeds", 0) == {"sst2": 0, "rte": 3}
    with pytest.raises(SystemExit):
        conv.parse_mpnet_seeds("wnli:2", ["sst2", "rte"], parser, "--mpnet-paper-seeds", 0)
    assert conv.parse_mpnet_sweep("rte:3e-4,rte:1e-3", ["sst2", "rte"], parser) == {"rte": [3e-4, 1e-3]}
    assert conv.parse_mpnet_sweep("", ["sst2"], parser) == {}
    for bad in ("wnli:1e-3", "rte:fast"):
        with pytest.raises(SystemExit):
            conv.parse_mpnet_sweep(bad, ["sst2", "rte"], parser)


def test_convergence_mpnet_paper_specs_run_each_method_at_1e5_unless_that_is_its_best_lr():
    from hyperadalora.bench.experiments import convergence as conv

    best = {("sst2", "mpnet", "adalora"): 1e-3, ("sst2", "mpnet", "hyperadalora"): 1e-5,
            ("wnli", "mpnet", "adalora"): 3e-3, ("wnli", "mpnet", "hyperadalora"): 3e-3}
    specs = conv.mpnet_paper_specs({"sst2": 2, "wnli": 1}, best, conv.TASKS)
    # seed by seed; HyperAdaLoRA on SST-2 already runs its seeds at 1e-5 as its best lr
    assert [s.key for s in specs] == ["sst2-mpnet-adalora-lr1e-05-s0", "wnli-mpnet-adalora-lr1e-05-s0",
                                      "wnli-mpnet-hyperadalora-lr1e-05-s0", "sst2-mpnet-adalora-lr1e-05-s1"]
    assert {s.overrides["lr"] for s in specs} == {conv.PAPER_LR}
    assert specs[1].overrides["steps"] == conv.TASKS["wnli"]["steps"]
    assert conv.mpnet_paper_specs({"sst2": 0}, best, conv.TASKS) == []


def test_convergence_sweep_table_marks_the_best_lr_per_model():
    from hyperadalora.bench.experiments import convergence as conv

    sweep = [{"task": "rte", "model": "mpnet", "method": "adalora", "lr": 3e-3, "final_smoothed_loss": 0.5, "best": True},
             {"task": "rte", "model": "mpnet", "method": "adalora", "lr": 1e-3, "final_smoothed_loss": 0.6, "best": False},
             {"task": "rte", "model": "mpnet", "method": "hyperadalora", "lr": 1e-3, "final_smoothed_loss": 0.55,
              "best": True},
             {"task": "rte", "model": "minilm", "method": "adalora", "lr": 1e-5, "final_smoothed_loss": 0.7, "best": True}]
    lines = conv.sweep_table(sweep, "mpnet", ["rte"])
    assert lines[1] == "Learning-rate sweep (MPNet, seed 0): final smoothed training loss"
    assert lines[3] == "| task | method | 0.001 | 0.003 |"
    assert lines[5:] == ["| rte | adalora | 0.6000 | 0.5000 * |", "| rte | hyperadalora | 0.5500 * |  |"]
