"""The benchmark statistics (``hyperadalora.bench.stats``) and the tuned experiment's grid growth,
against hand computations and closed forms."""

from __future__ import annotations

import math

import pytest

from hyperadalora.bench.experiments.tuned import LADDER, extend
from hyperadalora.bench.stats import good_lr_window, mean_ci, paired_test, verdict

# Student t quantile t_{0.975, 4} from a printed table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2).
T_975_DF4 = 2.776


def test_mean_ci_is_the_t_interval_written_out():
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    sd = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (4 - 3) ** 2 + (5 - 3) ** 2) / 4)  # sqrt(2.5)
    assert mean == 3.0
    assert half == pytest.approx(T_975_DF4 * sd / math.sqrt(5), abs=1e-3)  # 1.963
    # Wider at 99% than at 95%; no spread to estimate from one value; nothing from none.
    assert mean_ci([1.0, 2.0, 3.0, 4.0, 5.0], 0.99)[1] > half
    assert mean_ci([0.7]) == (0.7, None)
    assert mean_ci([]) == (None, None)
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=95)


def test_paired_test_pairs_by_seed_and_matches_the_closed_form_for_two_degrees_of_freedom():
    # Differences 1, 2, 3 on seeds 0..2 (seed 7 only in `a`: left out). t = 2 / (1 / sqrt 3);
    # for 2 degrees of freedom the t CDF is 1/2 + t / (2 sqrt(2 + t^2)).
    a = {2: 3.0, 0: 1.0, 1: 2.0, 7: 100.0}
    b = {0: 0.0, 1: 0.0, 2: 0.0}
    test = paired_test(a, b)
    t = 2 / (1 / math.sqrt(3))
    p = 2 * (1 - (0.5 + t / (2 * math.sqrt(2 + t * t))))
    assert (test.n, test.mean_diff) == (3, 2.0)
    assert test.t == pytest.approx(t) and test.p == pytest.approx(p)  # p = 0.0742
    assert not test.significant() and test.significant(alpha=0.1)
    assert verdict(test, higher_is_better=True) == "n.s."
    assert verdict(test, higher_is_better=True, alpha=0.1) == "better"
    assert verdict(test, higher_is_better=False, alpha=0.1) == "worse"
    assert paired_test({0: 1.0}, {0: 2.0, 1: 3.0}) is None and verdict(None, True) == "n/a"


def test_good_lr_window_keeps_the_lrs_within_two_percent_of_the_best_loss():
    losses = {1e-3: 0.40, 3e-3: 0.392, 1e-2: 0.3998, 3e-2: 0.41, 1e-4: None, 1e-1: math.inf}
    # best 0.392; bound 0.392 * 1.02 = 0.39984: 0.3998 is in, 0.40 is out.
    assert good_lr_window(losses) == [3e-3, 1e-2]
    assert good_lr_window(losses, tolerance=0.05) == [1e-3, 3e-3, 1e-2, 3e-2]
    assert good_lr_window({1e-3: None}) == []
    with pytest.raises(ValueError, match="tolerance"):
        good_lr_window(losses, tolerance=-0.1)


def test_a_best_lr_at_an_end_of_the_grid_grows_it_by_the_next_ladder_lr():
    grid = [1e-3, 3e-3, 1e-2]
    assert extend(grid, 1e-2) == 3e-2  # best at the top: one step up
    assert extend(grid, 1e-3) == 3e-4  # at the bottom: one step down
    assert extend(grid, 3e-3) is None  # strictly inside: done
    assert extend(grid, None) == 3e-4  # every run diverged: go down
    assert extend([LADDER[-2], LADDER[-1]], LADDER[-1]) is None  # nothing left to try


def fake_run(method, lr, seed, loss, acc, calibration=None):
    """A cached run whose smoothed loss is ``loss`` throughout (a constant curve)."""
    return {"key": f"sst2-minilm-{method}-lr{lr:g}-s{seed}", "lr": lr, "seed": seed, "diverged": False,
            "tags": {"task": "sst2", "model": "minilm", "method": method, "lr": lr, "seed": seed},
            "losses": [loss] * 4, "step_times": [0.5] * 4, "final_smoothed": loss,
            "final_metrics": {"accuracy": acc}, "allocation": None if calibration is None else {"seconds": calibration}}


def test_tuned_rows_and_summary_against_hand_computation():
    from hyperadalora.bench.experiments.tuned_report import render, rows_of, summarize

    runs = [fake_run("adalora", 3e-3, s, loss, acc) for s, loss, acc in ((0, 0.40, 0.80), (1, 0.30, 0.82),
                                                                           (2, 0.35, 0.81))]
    runs += [fake_run("sensitivity", 1e-3, s, loss, acc, calibration=2.0)
             for s, loss, acc in ((0, 0.20, 0.84), (1, 0.40, 0.85), (2, 0.25, 0.86))]
    runs.append(fake_run("sensitivity", 3e-3, 0, 0.9, 0.5))  # another lr: not a row
    rows = rows_of(runs, "sst2", "minilm", {"adalora": 3e-3, "sensitivity": 1e-3}, "accuracy")
    assert len(rows) == 6 and all(r["target_loss"] == pytest.approx(0.35) for r in rows)  # mean of AdaLoRA finals
    # Constant curves: a run reaches the target at step 1 or never (0.40 > 0.35).
    assert [r["steps_to_target"] for r in rows] == [None, 1, 1, 1, None, 1]
    sweep = [{"method": "adalora", "lr": lr, "final_smoothed_loss": v, "best": lr == 3e-3, "diverged": False}
             for lr, v in ((1e-3, 0.6), (3e-3, 0.40), (1e-2, 0.405))]
    sweep += [{"method": "sensitivity", "lr": lr, "final_smoothed_loss": v, "best": lr == 1e-3, "diverged": False}
              for lr, v in ((1e-3, 0.20), (3e-3, 0.9))]
    cost = {"adalora": {"step_s": 0.4, "peak_mib": 100.0, "trainable": 10},
            "sensitivity": {"step_s": 0.2, "peak_mib": 80.0, "trainable": 8}}
    summary = summarize(rows, sweep, {"adalora": [1e-3, 3e-3, 1e-2], "sensitivity": [1e-3, 3e-3]}, cost)
    ada, sens = summary["adalora"], summary["sensitivity"]
    assert ada["best_inside_grid"] and not sens["best_inside_grid"]
    assert ada["good_lr_window"] == [3e-3, 1e-2] and sens["good_lr_window"] == [1e-3]  # 0.405 <= 0.408
    assert sens["dev_metric"]["mean"] == pytest.approx(0.85)
    assert sens["dev_metric"]["ci95"] == pytest.approx(4.303 * 0.01 / math.sqrt(3), abs=1e-4)  # t_{.975,2} = 4.303
    assert sens["steps_to_target"] == {"mean": 1, "ci95": 0.0, "reached": 2}
    # Interleaved time: steps x step time + calibration; all 4 steps in total.
    assert sens["time_to_target_s"] == pytest.approx(1 * 0.2 + 2.0)
    assert sens["total_time_s"] == pytest.approx(4 * 0.2 + 2.0) and ada["total_time_s"] == pytest.approx(1.6)
    assert sens["step_ratio_to_adalora"] == pytest.approx(0.5)
    acc_test = sens["vs_adalora"]["dev_metric"]  # differences 0.04, 0.03, 0.05 paired by seed
    assert acc_test["n"] == 3 and acc_test["mean_diff"] == pytest.approx(0.04)
    assert acc_test["t"] == pytest.approx(0.04 / (0.01 / math.sqrt(3))) and acc_test["verdict"] == "better"
    assert sens["vs_adalora"]["steps_to_target"] is None  # only seed 1 reached with both: no test
    text = "\n".join(render({"config": {"task": "sst2", "model": "minilm", "steps": 4, "batch_size": 16,
                                        "target_loss": 0.35, "cost_steps": 20, "cost_seq_len": 32, "metric": "accuracy",
                                        "labels": {"adalora": "AdaLoRA", "sensitivity": "Sensitivity-LoRA"}},
                             "sweep": sweep, "summary": summary}))
    assert "| Sensitivity-LoRA | 0.001 (0.001, 0.003) edge | 3 |" in text
    assert "| +0.0400 (n 3, p " in text and "| 0.2000 * w | 0.9000 |  | 1 |" in text
    assert "| 0.50 | 2.2 | 3 (1.75) | 2.00 | 80 | 8 |" in text  # step ratio, time to target, total (/ AdaLoRA)
    # Without a step cost (--cost-steps 0) a time to target that was reached is unknown, not "never".
    no_cost = summarize(rows, sweep, {"adalora": [1e-3, 3e-3, 1e-2], "sensitivity": [1e-3, 3e-3]}, {})
    text = "\n".join(render({"config": {"task": "sst2", "model": "minilm", "steps": 4, "batch_size": 16,
                                        "target_loss": 0.35, "cost_steps": 0, "cost_seq_len": 32, "metric": "accuracy",
                                        "labels": {"adalora": "AdaLoRA", "sensitivity": "Sensitivity-LoRA"}},
                             "sweep": sweep, "summary": no_cost}))
    assert "| 1 ± 0 (2/3) | n/a | n/a | n/a | 2.00 |" in text and "never" not in text


def test_the_sweep_grows_each_grid_until_its_best_lr_is_inside_or_the_growth_budget_is_spent():
    from hyperadalora.bench.experiments.tuned import sweep

    # Final loss |log10(lr / optimum)|: AdaLoRA's optimum 3e-2 lies above the starting grid, LoRA's 3e-3 inside.
    optimum = {"adalora": 3e-2, "lora": 3e-3}
    ran = []

    def run(specs):
        ran.extend(s.key for s in specs)
        return {s.key: {"lr": s.tags["lr"], "diverged": False,
                        "losses": [abs(math.log10(s.tags["lr"] / optimum[s.tags["method"]]))] * 3} for s in specs}

    start = [1e-3, 3e-3, 1e-2]
    results, grids = sweep("sst2", ["adalora", "lora"], {"adalora": start, "lora": start}, 2, run)
    assert grids == {"adalora": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], "lora": [1e-3, 3e-3, 1e-2]}
    assert len(ran) == len(set(ran)) == 8  # every run once
    assert sorted(results) == sorted(ran)
    _, grids = sweep("sst2", ["adalora"], {"adalora": start}, 1, run)
    assert grids == {"adalora": [1e-3, 3e-3, 1e-2, 3e-2]}  # budget spent: the best stays at the edge
    # A run missing (--report-only, or a stopped benchmark): that grid does not grow.
    _, grids = sweep("sst2", ["adalora"], {"adalora": start}, 2, lambda specs: run([s for s in specs
                                                                                     if s.tags["lr"] != 1e-3]))
    assert grids == {"adalora": start}


def test_import_runs_caches_a_convergence_curve_of_the_same_protocol_as_this_specs_run(tmp_path):
    from hyperadalora.bench.experiments.tuned import import_runs, parse_args, spec
    from hyperadalora.bench.runner import load_cached

    curve = {"key": "sst2-minilm-adalora-lr0.003-s1", "task": "sst2", "model": "minilm", "method": "adalora",
             "lr": 3e-3, "seed": 1, "losses": [0.7, 0.5, 0.4], "step_times": [1.0, 2.0, 3.0], "diverged": False,
             "final_metrics": {"accuracy": 0.8}, "total_rank": [432, 400, 288]}
    other = {**curve, "key": "sst2-mpnet-adalora-lr0.003-s1", "model": "mpnet"}  # another model: not this protocol
    source = tmp_path / "convergence.json"
    source.write_text(__import__("json").dumps({"curves": [curve, other]}))
    args = parse_args(["--methods", "adalora,lora", "--work-dir", str(tmp_path / "cache")])
    assert import_runs(str(source), args).imported == ["sst2-minilm-adalora-lr0.003-s1"]
    cached = load_cached(spec("sst2", "adalora", 3e-3, 1), args.work_dir)  # the config check passes
    assert cached["losses"] == curve["losses"] and cached["seconds"] == 6.0
    assert cached["final_smoothed"] == pytest.approx((0.7 * 0.81 + 0.5 * 0.9 + 0.4) * 0.1 / (1 - 0.9 ** 3))
    again = import_runs(str(source), args)  # cached already: left alone, and said so
    assert again.imported == [] and again.cached == ["sst2-minilm-adalora-lr0.003-s1"]
    assert again.summary("c.json") == ("tuned: imported 0 runs from c.json "
                                       "(1 cached already, 0 of another protocol skipped)")
    renamed = tmp_path / "renamed.json"  # a curve whose key its tags do not give: another protocol's run
    foreign = {**curve, "key": "sst2-minilm-adalora-lr0.003-s1-400steps"}
    renamed.write_text(__import__("json").dumps({"curves": [foreign]}))
    assert import_runs(str(renamed), args) == ([], [], ["sst2-minilm-adalora-lr0.003-s1-400steps"])
    mpnet = parse_args(["--methods", "adalora", "--model", "mpnet", "--work-dir", str(tmp_path / "cache")])
    # --model picks the other curve
    assert import_runs(str(source), mpnet).imported == ["sst2-mpnet-adalora-lr0.003-s1"]
    assert load_cached(spec("sst2", "adalora", 3e-3, 1, "mpnet"), mpnet.work_dir)["losses"] == other["losses"]
    with pytest.raises(FileNotFoundError, match="--import-runs"):
        import_runs(str(tmp_path / "missing.json"), args)


def test_a_tuned_results_curves_round_trip_through_import_runs_into_the_same_rows(tmp_path):
    """A tuned result's curves (older ones without step times) import as the runs they came from:
    rebuilding the result from them gives the same rows; Sensitivity-LoRA keeps its allocation."""
    import json

    from hyperadalora.bench.experiments.tuned import build_result, import_runs, parse_args, spec
    from hyperadalora.bench.runner import load_cached

    losses = {("adalora", 0): [0.7, 0.5, 0.4], ("adalora", 1): [0.7, 0.6, 0.45],
              ("sensitivity", 0): [0.7, 0.45, 0.3], ("sensitivity", 1): [0.7, 0.5, 0.5]}
    allocation = {"policy": "sensitivity", "seconds": 2.5, "ranks": {"layer.0.q": 3, "layer.0.v": 13}}
    curves = [{"key": spec("sst2", m, 3e-3, s).key, "task": "sst2", "model": "minilm", "method": m, "lr": 3e-3,
               "seed": s, "losses": x, "final_metrics": {"accuracy": 0.8 + s / 100}, "diverged": False,
               "allocation": allocation if m == "sensitivity" else None} for (m, s), x in losses.items()]
    source = tmp_path / "tuned.json"
    source.write_text(json.dumps({"curves": curves}))
    args = parse_args(["--methods", "adalora,sensitivity", "--lrs", "3e-3", "--seeds", "2", "--work-dir",
                       str(tmp_path / "cache"), "--import-runs", str(source)])
    assert len(import_runs(str(source), args).imported) == 4
    results = {s.key: load_cached(s, args.work_dir) for s in (spec("sst2", m, 3e-3, k) for m, k in losses)}
    assert results[spec("sst2", "sensitivity", 3e-3, 0).key]["allocation"] == allocation
    result = build_result(args, results, {"adalora": [3e-3], "sensitivity": [3e-3]},
                          {"adalora": 3e-3, "sensitivity": 3e-3}, {})
    rows = {(r["method"], r["seed"]): r for r in result["rows"]}
    target = (results[curves[0]["key"]]["final_smoothed"] + results[curves[1]["key"]]["final_smoothed"]) / 2
    assert rows["adalora", 0]["target_loss"] == pytest.approx(target)
    # By hand: target (0.5229 + 0.5745) / 2 = 0.5487; sensitivity seed 0 smooths to 0.7, 0.568, 0.469.
    assert target == pytest.approx(0.5487, abs=1e-4)
    assert rows["sensitivity", 0]["steps_to_target"] == 3 and rows["sensitivity", 0]["seconds_to_target"] is None
    assert rows["sensitivity", 0]["calibration_s"] == 2.5 and rows["sensitivity", 1]["steps_to_target"] is None
    assert [c["losses"] for c in result["curves"]] == [c["losses"] for c in curves]
    with pytest.raises(SystemExit):  # a missing file is refused before anything is imported or run
        parse_args(["--import-runs", f"{source},{tmp_path / 'missing.json'}"])


def test_method_lrs_give_a_method_its_own_starting_grid_and_bad_ones_are_refused(capsys):
    from hyperadalora.bench.experiments.tuned import parse_args

    args = parse_args(["--methods", "adalora,hyperadalora", "--method-lrs", "hyperadalora:1e-3,hyperadalora:3e-4"])
    assert args.grids == {"adalora": [1e-3, 3e-3, 1e-2], "hyperadalora": [3e-4, 1e-3]}
    for bad in (["--methods", "adalora", "--method-lrs", "lora:1e-3"], ["--method-lrs", "adalora:fast"], ["--methods", "lora"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert "--method" in capsys.readouterr().err


def test_the_instruction_task_runs_on_the_causal_lm_only_and_mismatches_are_refused(capsys):
    from hyperadalora.bench.experiments.tuned import parse_args

    args = parse_args(["--task", "alpaca", "--model", "smollm2", "--methods", "adalora,lora"])
    assert (args.task, args.model) == ("alpaca", "smollm2")
    for bad in (["--task", "alpaca"], ["--model", "smollm2"], ["--task", "sst2", "--model", "smollm2"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert "instruction task" in capsys.readouterr().err


def test_an_instruction_run_is_the_shipped_alpaca_presets_adapter_without_a_head_at_the_protocols_budget():
    """The tuned SmolLM2 run adapts what configs/alpaca_smollm2_adalora.yaml adapts (read from the
    shipped file, not from the code under test), trains no classifier, and keeps the rank budget."""
    from pathlib import Path

    import yaml

    from hyperadalora.bench.experiments.tuned import spec
    from hyperadalora.bench.runner import spec_config
    from hyperadalora.train import load_run_config

    preset = yaml.safe_load((Path(__file__).parents[2] / "configs" / "alpaca_smollm2_adalora.yaml").read_text())
    ada = load_run_config(spec_config(spec("alpaca", "adalora", 1e-3, 1, "smollm2")), {})
    lora = load_run_config(spec_config(spec("alpaca", "lora", 1e-3, 1, "smollm2")), {})
    assert (ada.task, ada.model, ada.lr, ada.seed, ada.steps, ada.batch_size) == ("alpaca", "smollm2", 1e-3, 1, 100, 2)
    assert list(ada.adapter.target_modules) == preset["adapter"]["target_modules"]
    assert ada.adapter.lora_alpha == preset["adapter"]["lora_alpha"] and ada.adapter.modules_to_save == ()
    assert (ada.adapter.r, ada.adapter.allocator.target_r, lora.adapter.r) == (12, 8, 8)
    assert lora.adapter.method == "lora" and lora.adapter.modules_to_save == ()


def test_the_causal_cost_step_scores_the_batchs_own_tokens():
    import torch

    from hyperadalora.bench.experiments.tuned_cost import as_causal_lm, make_batch

    seen = []
    batch = make_batch(2, 5)
    as_causal_lm(lambda b, accumulate=1, phases=None: seen.append((b, accumulate)))(batch, 3)
    (given, accumulate), = seen
    assert accumulate == 3 and torch.equal(given["labels"], batch["input_ids"])
    assert given["labels"].shape == (2, 5) and batch["labels"].shape == (2,)  # the class labels are left alone


def test_the_held_out_measure_reads_the_recorded_curve_unsmoothed():
    from hyperadalora.bench.curves import MEASURES, best_lr

    held_out, training = MEASURES["held_out"], MEASURES["training"]
    curve = {"key": "k", "losses": [2.0, 1.0, 1.0, 1.0], "step_times": [0.5, 0.5, 0.5, 0.25],
             "eval_losses": [[2, 1.9], [4, 1.7]]}
    assert held_out.final(curve) == 1.7
    assert held_out.reach(curve, 1.8) == (4, 1.75)  # the first evaluated step at or below: step 4, 1.75 s
    assert held_out.reach(curve, 1.9) == (2, 1.0) and held_out.reach(curve, 1.6) == (None, None)
    # The training measure: the bias-corrected EMA (beta 0.9) of the per-step losses at the last step.
    assert training.final(curve) == pytest.approx(0.1 * (2.0 * 0.729 + 0.81 + 0.9 + 1.0) / (1 - 0.9 ** 4))
    assert training.reach(curve, 1.25) == (4, 1.75)  # smoothed: 2.0, 1.474, 1.299, 1.212
    with pytest.raises(ValueError, match="eval_loss_every"):
        held_out.final({"key": "sst2-run", "losses": [1.0], "eval_losses": None})
    # Each measure picks its own best lr: lower training loss at 1e-3, lower held-out loss at 3e-3.
    runs = [{"lr": 1e-3, "losses": [0.5] * 3, "eval_losses": [[3, 0.9]]},
            {"lr": 3e-3, "losses": [0.6] * 3, "eval_losses": [[3, 0.8]]}]
    assert best_lr(runs) == 1e-3 and best_lr(runs, held_out) == 3e-3


def test_a_tuned_result_on_the_held_out_measure_and_its_round_trip(tmp_path, monkeypatch):
    """--target-on held_out: keys and configs record the held-out curve; the target, the steps to it,
    the final loss and the best lr come from that curve, not from the training loss."""
    import json

    from hyperadalora.bench.experiments import tuned_report
    from hyperadalora.bench.experiments.tuned import build_result, import_runs, parse_args, run_spec

    args = parse_args(["--methods", "adalora,lora", "--lrs", "3e-3", "--seeds", "2", "--target-on", "held_out",
                       "--work-dir", str(tmp_path / "cache")])
    assert args.eval_loss_every == 10
    assert run_spec(args, "lora", 3e-3, 1).key == "sst2-minilm-lora-lr0.003-s1-el10"
    assert run_spec(args, "lora", 3e-3, 1).overrides["eval_loss_every"] == 10

    def run(method, seed, points, training):
        key = run_spec(args, method, 3e-3, seed).key
        return {"key": key, "tags": {"task": "sst2", "model": "minilm", "method": method, "lr": 3e-3, "seed": seed},
                "lr": 3e-3, "seed": seed, "diverged": False, "losses": [training] * 30, "step_times": [1.0] * 30,
                "final_smoothed": training, "final_metrics": {"accuracy": 0.8}, "eval_losses": points}

    runs = [run("adalora", 0, [[10, 0.6], [20, 0.5], [30, 0.5]], 0.3),
            run("adalora", 1, [[10, 0.6], [20, 0.45], [30, 0.4]], 0.2),
            run("lora", 0, [[10, 0.44], [20, 0.42], [30, 0.41]], 0.9),
            run("lora", 1, [[10, 0.5], [20, 0.46], [30, 0.46]], 0.9)]
    result = build_result(args, {r["key"]: r for r in runs}, {"adalora": [3e-3], "lora": [3e-3]},
                          {"adalora": 3e-3, "lora": 3e-3}, {})
    assert result["config"]["target_loss"] == pytest.approx(0.45)  # AdaLoRA's held-out finals 0.5 and 0.4
    rows = {(r["method"], r["seed"]): r for r in result["rows"]}
    assert [rows[k]["steps_to_target"] for k in sorted(rows)] == [None, 20, 10, None]
    assert rows[("lora", 0)]["final_loss"] == 0.41 and rows[("lora", 0)]["final_smoothed_loss"] == 0.9
    assert result["summary"]["lora"]["final_loss"]["mean"] == pytest.approx(0.435)
    assert result["summary"]["lora"]["vs_adalora"]["final_loss"]["mean_diff"] == pytest.approx(-0.015)
    text = "\n".join(tuned_report.render(result))
    assert "Target: AdaLoRA's final held-out loss (dev rows, every 10 steps, unsmoothed)" in text
    monkeypatch.setattr(tuned_report, "result_path", lambda name: tmp_path / f"{name}.png")
    drawn, draw = [], tuned_report.plot_curve_groups
    monkeypatch.setattr(tuned_report, "plot_curve_groups", lambda *a, **kw: (drawn.append(kw), draw(*a, **kw)))
    tuned_report.plot(result, "held")
    assert (tmp_path / "held.png").stat().st_size > 0
    # The held-out curves get their own panel, with the target drawn there rather than on the training loss.
    assert drawn[0]["target"] == {"held-out loss": pytest.approx(0.45)}
    assert {k: len(v) for k, v in drawn[0]["panels"].items()} == {"training loss (smoothed)": 2, "held-out loss": 2}
    # The result's curves import as the same runs, held-out curve included; training-only runs do not.
    source = tmp_path / "held.json"
    training_only = {**result["curves"][0], "key": "sst2-minilm-adalora-lr0.003-s0", "eval_losses": None}
    source.write_text(json.dumps({"curves": [*result["curves"], training_only]}))
    imported = import_runs(str(source), args)
    assert sorted(imported.imported) == sorted(r["key"] for r in runs)
    assert imported.other_protocol == ["sst2-minilm-adalora-lr0.003-s0"]
    cached = json.loads((tmp_path / "cache" / f"{runs[1]['key']}.json").read_text())
    assert cached["eval_losses"] == runs[1]["eval_losses"]


def test_the_held_out_measure_needs_its_curve():
    from hyperadalora.bench.experiments.tuned import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--target-on", "held_out", "--eval-loss-every", "0"])
    assert parse_args([]).eval_loss_every == 0 and parse_args(["--eval-loss-every", "5"]).eval_loss_every == 5
