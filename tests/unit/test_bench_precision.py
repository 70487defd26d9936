"""The bf16-against-fp32 benchmark (issue 23, item 1): the same start, the adapter update it
compares, the summary against its tolerances; the CPU clock and the alternating order of the
interleaved timings."""

from __future__ import annotations

import json
import time

import pytest
import torch

from hyperadalora.bench import scale
from hyperadalora.bench.experiments import precision
from hyperadalora.bench.experiments.step_model import time_interleaved

CPU = torch.device("cpu")


def _pair(tmp_path, variant: str):
    models = {p: scale.adapt(scale.load_base("smollm2", scale.SETTINGS[p], CPU, tmp_path), variant, "causal-lm", 10, 4)
              for p in ("fp32", "bf16")}
    steps = {p: scale.make_trainer(m, scale.SETTINGS[p]) for p, m in models.items()}
    return models, steps


@pytest.mark.parametrize("variant", ["lora", "hyperadalora"])
def test_both_runs_start_from_the_same_float32_values(tmp_path, variant):
    models, _ = _pair(tmp_path, variant)
    precision.same_start_(models["bf16"], models["fp32"])
    ref = models["fp32"].state_dict()
    low = {k: v for k, v in models["bf16"].state_dict().items() if v.dtype == torch.float32}
    assert low, "the bf16 model holds float32 master tensors"
    for key, tensor in low.items():
        assert torch.equal(tensor, ref[key]), key
    base = models["bf16"].model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert base.dtype == torch.bfloat16  # the base itself stays bf16


def test_the_compared_update_is_each_layers_own_delta_weight(tmp_path):
    models, steps = _pair(tmp_path, "adalora")
    for i in range(3):  # a trained, non-zero update
        steps["fp32"](scale.random_batch("causal-lm", 2, 8, 128, "cpu", seed=i))
    deltas = precision.adapter_deltas(models["fp32"])
    assert set(deltas) == set(models["fp32"].adapted_layers)
    for name, layer in models["fp32"].adapted_layers.items():  # W_adapted - W0 by the merge path
        torch.testing.assert_close(deltas[name], layer.delta_weight(), rtol=1e-5, atol=1e-7)
    assert sum(float(d.abs().sum()) for d in deltas.values()) > 0


def test_peft_lora_deltas_equal_b_times_a_times_its_scaling(tmp_path):
    model = scale.adapt(scale.load_base("smollm2", scale.SETTINGS["fp32"], CPU, tmp_path), "peft-lora", "causal-lm",
                        10, 4)
    deltas = precision.adapter_deltas(model)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    by_hand = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    name = next(n for n in precision.adapter_deltas(model) if n.endswith("layers.0.mlp.down_proj"))
    torch.testing.assert_close(precision.adapter_deltas(model)[name], by_hand)
    assert float(deltas[name].abs().sum()) == 0.0  # B starts at zero


def test_summary_by_hand_and_the_verdict_against_the_tolerances():
    losses = {"fp32": [3.0] * 5 + [2.0] * 10, "bf16": [3.04] + [3.0] * 4 + [2.01] * 10}
    row = {"variant": "lora", "losses": losses, "update_rel_l2": 0.1}
    s = precision.summary(row)
    # by hand: |diff| is 0.04 once, 0 four times, 0.01 ten times -> max 0.04, mean 0.14 / 15
    assert s["max_step_loss_diff"] == pytest.approx(0.04, abs=1e-6)
    assert s["mean_step_loss_diff"] == pytest.approx(0.14 / 15, abs=1e-6)
    assert s["last10_mean_diff"] == pytest.approx(0.01, abs=1e-6)
    assert s["within"]
    assert not precision.summary({**row, "update_rel_l2": precision.TOLERANCES["update_rel_l2"] + 0.01})["within"]
    worse = {"fp32": losses["fp32"], "bf16": [3.1] + losses["bf16"][1:]}  # one step 0.1 off
    assert not precision.summary({**row, "losses": worse})["within"]


def test_smoke_run_writes_both_curves_and_agrees_at_the_first_step(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERADALORA_BENCHMARKS", str(tmp_path))
    (tmp_path / "results").mkdir()
    assert precision.main(["--smoke", "--steps", "10", "--variants", "lora,peft-lora"]) == 0
    result = json.loads((tmp_path / "results" / "precision.json").read_text())
    rows = {r["variant"]: r for r in result["variants"]}
    for r in rows.values():
        assert len(r["losses"]["fp32"]) == len(r["losses"]["bf16"]) == 10
        assert abs(r["losses"]["fp32"][0] - r["losses"]["bf16"][0]) < 1e-2  # same start, bf16 rounding only
    # B = 0 at the start in both libraries: the first fp32 losses are the base model's, equal
    assert rows["lora"]["losses"]["fp32"][0] == pytest.approx(rows["peft-lora"]["losses"]["fp32"][0], abs=1e-6)
    assert "| lora |" in (tmp_path / "results" / "precision.md").read_text()


def test_cli_refuses_unknown_variants_missing_data_and_too_few_steps():
    with pytest.raises(SystemExit):
        precision.parse_args(["--smoke", "--variants", "qlora"])
    with pytest.raises(SystemExit):
        precision.parse_args([])
    with pytest.raises(SystemExit):
        precision.parse_args(["--smoke", "--steps", "5"])


def test_the_cpu_clock_counts_work_not_waiting():
    def sleeper(batch, accumulate=1):
        time.sleep(0.05)

    def worker(batch, accumulate=1):
        end = time.process_time() + 0.05
        while time.process_time() < end:
            pass

    wall = time_interleaved({"sleep": sleeper, "work": worker}, None, 2, 0)
    cpu = time_interleaved({"sleep": sleeper, "work": worker}, None, 2, 0, clock=time.process_time)
    # The process's CPU time may run a little ahead of the wall clock (its other threads count too),
    # so 0.05 s of CPU work can take slightly less wall time: only the sleep's wall time is exact.
    assert min(wall["sleep"]) >= 0.05 and min(wall["work"]) >= 0.04
    assert max(cpu["sleep"]) < 0.02 and min(cpu["work"]) >= 0.05


def test_alternate_rounds_reverse_the_order_of_the_variants():
    calls = []
    steps = {v: (lambda batch, accumulate=1, v=v: calls.append(v)) for v in ("a", "b", "c")}
    time_interleaved(steps, None, 3, 1, alternate=True)
    # warm-up once each in order, then rounds a b c / c b a / a b c
    assert calls == ["a", "b", "c"] + ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    calls.clear()
    time_interleaved(steps, None, 2, 0)
    assert calls == ["a", "b", "c", "a", "b", "c"]
