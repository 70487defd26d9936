"""The benchmark registry against the committed results: one registered command per result file,
every table a rendering of its JSON, every section in BENCHMARKS.md, and the Makefile running the
registry; and the step the cost experiments time is the library's."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from hyperadalora.bench import registry
from hyperadalora.bench.experiments import step_cost, step_model
from hyperadalora.bench.experiments.convergence_quick import reach

from test_bench import ema
from test_train_loop import tiny_bert_dir

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
COMMITTED = sorted(p.stem for p in RESULTS.glob("*.json"))


def test_every_committed_result_has_exactly_one_registered_command_that_names_it():
    written = [c.result for _, c in registry.commands() if c.group != "pending"]
    assert sorted(written) == COMMITTED  # no result without a command, no command without a result, no twice
    pending = [c.result for _, c in registry.commands("pending")]
    # A pending command's result is not committed yet (once it is, the command moves to "full"); none twice.
    assert pending and not set(pending) & set(COMMITTED) and len(set(pending)) == len(pending)
    for exp, cmd in registry.commands():
        # The experiment's own option parsing gives the result name the command is registered under.
        assert exp.parse_args(registry.argv_of(exp, cmd, "../shared/data")).name == cmd.result, cmd


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_table_is_the_rendering_of_its_json(name):
    rendered = registry.render_result(name, json.loads((RESULTS / f"{name}.json").read_text()))
    assert rendered == (RESULTS / f"{name}.md").read_text()


def test_render_check_finds_a_changed_table_and_rewrites_it(tmp_path):
    for suffix in (".json", ".md"):
        (tmp_path / f"nlg{suffix}").write_bytes((RESULTS / f"nlg{suffix}").read_bytes())
    assert registry.rebuild([], check=True, folder=tmp_path) == 0
    (tmp_path / "nlg.md").write_text("stale\n")
    assert registry.rebuild(["nlg"], check=True, folder=tmp_path) == 1
    assert (tmp_path / "nlg.md").read_text() == "stale\n"  # --check writes nothing
    assert registry.rebuild(["nlg"], folder=tmp_path) == 0
    assert (tmp_path / "nlg.md").read_bytes() == (RESULTS / "nlg.md").read_bytes()


def test_every_experiment_names_a_section_heading_of_benchmarks_md():
    headings = {line for line in (ROOT / "BENCHMARKS.md").read_text().splitlines() if line.startswith("#")}
    for exp in registry.registered().values():
        assert exp.section in headings, exp.name


def test_every_table_marker_of_benchmarks_md_is_a_registered_result_and_publish_is_current():
    from hyperadalora.bench.experiments.publish import MARKER, publish

    text = (ROOT / "BENCHMARKS.md").read_text()
    markers = {m["name"] for m in MARKER.finditer(text)}
    assert markers and markers <= set(COMMITTED)
    assert publish(text, RESULTS) == (text, [])


def test_the_makefile_runs_the_registry_and_no_command_of_its_own():
    make = (ROOT / "Makefile").read_text()
    lines = [ln.strip() for ln in make.splitlines() if ln.strip().startswith("$(BENCH)")]
    assert lines == ["$(BENCH) all --data-dir $(DATA_DIR)", "$(BENCH) publish",
                     "$(BENCH) all --group quick --data-dir $(DATA_DIR)"]
    assert {c.result for _, c in registry.commands("quick")} == {"convergence_bench_quick", "cost_per_step_quick"}


def test_bench_all_dry_run_prints_the_registered_commands_in_order(capsys):
    assert registry.bench_main(["all", "--group", "quick", "--dry-run", "--data-dir", "D"]) == 0
    assert capsys.readouterr().err.splitlines() == ["hyperadalora bench convergence --quick --data-dir D",
                                                    "hyperadalora bench cost_per_step --quick"]
    assert registry.bench_main(["commands"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(COMMITTED) + len(registry.commands("pending"))
    assert printed[0].startswith("hyperadalora bench convergence --lrs")
    assert registry.bench_main(["all", "--group", "pending", "--dry-run"]) == 0
    assert capsys.readouterr().err.splitlines() == registry.commands_text("pending").splitlines()


def test_the_pending_lr_grid_extends_the_committed_grid_above_adaloras_best():
    committed = json.loads((RESULTS / "convergence.json").read_text())
    best = {s["lr"] for s in committed["sweep"] if s["best"] and s["method"] == "adalora" and s["model"] == "minilm"}
    assert best == {max(committed["config"]["lrs"])}  # AdaLoRA's best is the top of the committed grid
    exp, cmd = registry.command_for("convergence_lr_grid")
    lrs = [float(x) for x in exp.parse_args(list(cmd.args)).lrs.split(",")]
    assert set(committed["config"]["lrs"]) < set(lrs) and max(lrs) == 3e-2


def test_step_cost_goal_commands_name_the_312_wide_default_as_the_committed_rows_do():
    goal = json.loads((RESULTS / "step_cost_goal_b16.json").read_text())
    exp, cmd = registry.command_for("step_cost_goal_b16")
    args = exp.parse_args(list(cmd.args))
    assert args.variant_list == [r["variant"] for r in goal["rows"]]
    assert args.hyper_base_fields == {"hidden": 312}
    # The committed parameter counts: hyper_adalora 312 wide, +hidden=128 the new default.
    params = {r["variant"]: r["trainable_params"] for r in goal["rows"]}
    assert params["hyper_adalora"] == 5_874_435 and params["hyper_adalora+hidden=128"] == 1_586_375


def test_memory_note_reads_the_flag_or_infers_it_from_old_results():
    assert step_cost.memory_note({"memory_batch_size": 64}) == " Memory: one un-accumulated batch of 64 rows."
    assert step_cost.memory_note({"memory_batch_size": None, "memory_batch": "64 rows x 1 micro-batches"}) == ""
    old = {"batch_size": 16, "accumulate": 4}
    assert step_cost.memory_note({**old, "memory_batch": "64 rows x 1 micro-batches"}).endswith("batch of 64 rows.")
    assert step_cost.memory_note({**old, "memory_batch": "16 rows x 4 micro-batches"}) == ""
    assert step_cost.memory_note(old) == ""


def test_convergence_quick_reach_counts_cumulative_seconds():
    run = {"task_losses": [1.0, 0.8, 0.6, 0.4], "elapsed": [0.5, 1.5, 3.0, 5.0]}
    target = ema(run["task_losses"])[2]
    assert reach(run, target) == (3, pytest.approx(3.0))
    assert reach(run, 0.0) == (None, None)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir(tmp_path_factory.mktemp("sc")))


def tiny_batch(n=4, seq=8):
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(5, 20, (n, seq), generator=g),
            "attention_mask": torch.ones(n, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (n,), generator=g)}


@pytest.mark.parametrize("variant", ["adalora", "hyper_adalora+hidden=16", "hyper_lora_mlp_rank+hidden=16"])
def test_the_timed_step_is_the_training_step_written_out(tiny_base, variant):
    torch.manual_seed(0)
    model = step_model.adapt(variant, copy.deepcopy(tiny_base))
    step, trainable, _ = step_model.make_step(model, variant)
    torch.manual_seed(0)
    ref = step_model.adapt(variant, copy.deepcopy(tiny_base))
    ref.train()
    params = [p for p in ref.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == trainable
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch, phases = tiny_batch(), {}
    for i in range(2):  # by hand: two micro-batches, hypernetwork backward, AdamW, allocation, zero_grad
        if getattr(ref, "hyper", None) is not None:
            ref.hyper.regenerate()
        for _ in range(2):
            (ref(**batch).loss / 2).backward()
        if hasattr(ref, "backward_hypernetworks"):
            ref.backward_hypernetworks()
        opt.step()
        ref.after_step(i)
        opt.zero_grad(set_to_none=True)
        step(batch, 2, phases)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert set(phases) == {"generate", "hyper_backward", "optimizer"} and all(len(v) == 2 for v in phases.values())


def test_hyper_base_sets_every_hyper_variant_under_its_own_overrides(tiny_base):
    count = lambda v, base=None: step_model.build(v, tiny_base, base)[1]  # noqa: E731
    assert count("hyper_adalora", {"hidden": 24}) == count("hyper_adalora+hidden=24")
    assert count("hyper_adalora+hidden=16", {"hidden": 24}) == count("hyper_adalora+hidden=16")
    assert count("adalora", {"hidden": 24}) == count("adalora")
    assert count("hyper_adalora", {"hidden": 24}) > count("hyper_adalora", {"hidden": 16}) > count("adalora")


def test_similarity_table_says_over_how_many_modules_a_mean_is_and_shows_the_control_pair():
    from hyperadalora.bench.experiments import similarity

    nan = float("nan")
    kinds = {"P": 0.5, "lam": 0.1, "Q": 0.5}
    pairs = [*similarity.PAIRS, similarity.CONTROL.format(seed=1)]
    # Module b's hyper-vs-adalora dW is 0/0 (an update masked to zero): the dW mean is over a alone.
    per_module = [{"module": m, **{f"{p}|{k}": v for p in pairs for k, v in kinds.items()},
                   **{f"{p}|dW": dw for p in pairs}} for m, dw in (("a", 0.2), ("b", nan))]
    for r, control in zip(per_module, (0.6, 0.4)):
        r["adalora vs adalora seed 1|dW"] = control
    mean = {k: similarity.nanmean([r[k] for r in per_module]) for k in per_module[0] if k != "module"}
    lines = similarity.render({"config": {"task": "sst2", "lr": 1e-3}, "mean": mean, "per_module": per_module})
    assert "mean over the 2 adapted modules (" in lines[0]
    assert "hyper vs adalora dW: over the 1 where both are non-zero" in lines[0]
    assert "adalora vs adalora seed 1 dW" not in lines[0]  # both control modules count
    assert lines[-1] == "| adalora vs adalora seed 1 | 0.500 | 0.100 | 0.500 | 0.500 |"
    assert lines[4] == "| hyper vs adalora | 0.500 | 0.100 | 0.500 | 0.200 |"


def test_comma_choices_keeps_known_items_and_refuses_unknown_ones_by_name(capsys):
    import argparse

    from hyperadalora.bench.experiments.common import comma_choices

    parser = argparse.ArgumentParser(prog="x")
    assert comma_choices(parser, "a,,b", ("a", "b", "c"), "variants") == ["a", "b"]
    assert comma_choices(parser, "hyper_x", ("a",), "variants", lambda v: v.startswith("hyper_")) == ["hyper_x"]
    with pytest.raises(SystemExit):
        comma_choices(parser, "a,zz", ("a", "b"), "models")
    assert "unknown models ['zz']; choose from a, b" in capsys.readouterr().err


def test_study_baseline_lr_is_pinned_or_cached_or_falls_back_to_lr_aloud(tmp_path, capsys):
    from hyperadalora.bench.experiments import body_ablation, study

    pinned = body_ablation.parse_args(["--lr", "1e-2", "--adalora-lr", "3e-3", "--work-dir", str(tmp_path)])
    assert study.baseline_lr(pinned) == 3e-3
    empty = body_ablation.parse_args(["--lr", "1e-2", "--work-dir", str(tmp_path)])
    assert study.baseline_lr(empty) == 1e-2  # nothing cached: the variants' lr, and it says so
    assert "no convergence sweep runs cached" in capsys.readouterr().out
