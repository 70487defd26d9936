"""``adapter.allocator.policy=sensitivity`` through a whole training run (tiny local models and data)."""

from __future__ import annotations

import json

import pytest

from hyperadalora.checkpoint import load_adapter, read_adapter_config
from hyperadalora.models import load_model
from hyperadalora.train import train
from hyperadalora.train.presets import load_run_config
from hyperadalora.train.rundir import load_run
from test_train_loop import tiny_bert_dir, tiny_llama_dir, write_instruct, write_rte


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("sensitivity-run")
    return {"bert": tiny_bert_dir(root), "llama": tiny_llama_dir(root),
            "data": write_instruct(write_rte(root / "data"))}


def glue(shared, tmp_path, preset, name, *overrides):
    return load_run_config(preset, [
        "task=rte", f"model={shared['bert']}", f"data_dir={shared['data']}", f"output_dir={tmp_path}",
        f"run_name={name}", "steps=3", "batch_size=4", "eval_every=0", "progress=false",
        "adapter.target_modules=[query,key,value]", *overrides])


@pytest.mark.parametrize("preset", ["sst2_minilm_lora", "rte_minilm_adalora"])
def test_run_records_the_calibration_and_trains_as_lora_with_that_rank_pattern(shared, tmp_path, preset):
    result = train(glue(shared, tmp_path, preset, "sens", "adapter.allocator.policy=sensitivity",
                        "adapter.allocator.calibration_rows=8", "adapter.allocator.calibration_batch_size=3"))
    run = result.run_dir
    record = json.loads((run / "allocation.json").read_text())
    assert record["policy"] == "sensitivity" and record["rows"] == 8 and record["seconds"] > 0
    assert record["tokens"] > 0
    saved = load_run(run)
    r = saved.adapter.r
    assert saved.adapter.rank_pattern == record["ranks"] and len(record["ranks"]) == 6
    assert sum(record["ranks"].values()) == r * 6 == record["total_rank"]
    assert (run / "allocation.png").read_bytes()[:4] == b"\x89PNG"
    config, modules = read_adapter_config(run / "adapter")
    assert {n: m["r"] for n, m in modules.items()} == record["ranks"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(row["total_rank"] == r * 6 for row in log)  # never pruned (then=none)
    # The same run given the rank pattern directly (no calibration) trains identically.
    pattern = "{" + ",".join(f"{k}: {v}" for k, v in record["ranks"].items()) + "}"
    plain = train(glue(shared, tmp_path, preset, "plain", f"adapter.rank_pattern={pattern}",
                       *(["adapter.allocator.target_r=4"] if "adalora" in preset else [])))
    if "adalora" in preset:  # AdaLoRA's own pruning would run there: compare the first step only
        assert plain.log[0]["loss"] == log[0]["loss"]
    else:
        assert [row["loss"] for row in plain.log] == [row["loss"] for row in log]
    base, _ = load_model(str(shared["bert"]), num_labels=2)
    assert record["budget"] == "ranks"  # the paper's rank total; the factor parameters it bought:
    assert record["parameters"] == sum(k * sum(base.get_submodule(n).weight.shape) for n, k in record["ranks"].items())
    assert {n: layer.r for n, layer in load_adapter(base, run / "adapter").adapted_layers.items()} == record["ranks"]


def test_instruction_run_calibrates_on_the_tokenised_train_rows(shared, tmp_path):
    cfg = load_run_config("alpaca_smollm2_adalora", [
        f"model={shared['llama']}", f"data_dir={shared['data']}", f"output_dir={tmp_path}", "run_name=alpaca",
        "steps=1", "batch_size=2", "grad_accum=1", "max_length=32", "eval_every=0", "eval_rows=1",
        "max_new_tokens=2", "progress=false", "adapter.method=lora", "adapter.allocator.policy=sensitivity",
        "adapter.allocator.diagonal=weight", "adapter.allocator.min_rank=0", "adapter.allocator.calibration_max_length=16"])
    result = train(cfg)
    record = json.loads((result.run_dir / "allocation.json").read_text())
    assert len(record["ranks"]) == 2 * 7 and sum(record["ranks"].values()) == 12 * 14
    assert record["settings"]["diagonal"] == "weight" and record["rows"] >= 1
