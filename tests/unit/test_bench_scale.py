"""The pure parts of the scale benchmarks (issue 23, items 6 and 7): round order, per-round ratios
against peft, the memory goals' verdicts, the settings' validation, the warm-up batch."""

from __future__ import annotations

import pytest
import torch

from hyperadalora.bench import scale
from hyperadalora.bench.experiments import scale_cpu


def test_rounds_alternate_their_order():
    names = ["lora", "adalora", "peft-lora"]
    assert scale_cpu.round_order(names, 0) == ["lora", "adalora", "peft-lora"]
    assert scale_cpu.round_order(names, 1) == ["peft-lora", "adalora", "lora"]
    assert scale_cpu.round_order(names, 2) == names
    assert names == ["lora", "adalora", "peft-lora"]  # not reordered in place


def test_ratios_are_taken_within_each_round_then_the_median():
    rounds = [{"lora": 10.0, "peft-lora": 8.0, "adalora": 9.0, "peft-adalora": 12.0},
              {"lora": 20.0, "peft-lora": 25.0, "adalora": 6.0, "peft-adalora": 4.0},
              {"lora": 3.0, "peft-lora": 3.0, "adalora": 5.0, "peft-adalora": 5.0}]
    out = scale_cpu.round_ratios(rounds, {"lora": "peft-lora", "adalora": "peft-adalora",
                                          "hyperadalora": "peft-adalora"})
    # by hand: lora 10/8 = 1.25, 20/25 = 0.8, 3/3 = 1 -> median 1; adalora 0.75, 1.5, 1 -> median 1
    assert out["lora"]["per_round"] == pytest.approx([1.25, 0.8, 1.0])
    assert out["lora"]["median"] == pytest.approx(1.0)
    assert out["adalora"]["per_round"] == pytest.approx([0.75, 1.5, 1.0])
    assert "hyperadalora" not in out  # not measured: no ratio rather than a made-up one
    # the ratio of medians would differ (median lora 10, peft 8: 1.25): per round is what is asked
    two = scale_cpu.round_ratios(rounds[:2], {"lora": "peft-lora"})
    assert two["lora"]["median"] == pytest.approx((1.25 + 0.8) / 2)


def _mem(peak):
    return {"peak_mib": peak, "model_mib": 1.0}


def test_memory_goals_compare_with_peft_and_with_our_fp32_run():
    result = {"config": {"settings": ["fp32", "4bit_fp32_ckpt"], "variants": list(scale.VARIANTS), "extra": []},
              "memory": {"fp32": {"lora": _mem(1000.0), "adalora": _mem(1000.0)},
                         "4bit_fp32_ckpt": {"lora": _mem(340.0), "peft-lora": _mem(330.0),
                                            "adalora": _mem(360.0), "peft-adalora": _mem(340.0)}}}
    rows = scale_cpu.goal_rows(result)
    # lora: 340 / 330 = 1.030 <= 1.05 yes; 340 / 1000 = 0.340 <= 0.35 yes
    # adalora: 360 / 340 = 1.059 no; 360 / 1000 = 0.360 no; hyperadalora: not measured, no row
    assert rows == [["4bit_fp32_ckpt", "lora", "peft-lora", "1.030", "yes", "0.340", "yes"],
                    ["4bit_fp32_ckpt", "adalora", "peft-adalora", "1.059", "no", "0.360", "no"]]
    # A chunked-loss setting (memory only): its peft twin is peft's at the setting without the chunked loss.
    result["config"]["extra"] = [("4bit_fp32_ckpt_chunk", ["lora"])]
    result["memory"]["4bit_fp32_ckpt_chunk"] = {"lora": _mem(165.0)}
    assert scale_cpu.goal_rows(result)[-1] == ["4bit_fp32_ckpt_chunk", "lora", "peft-lora", "0.500", "yes", "0.165",
                                               "yes"]


def test_peft_variants_are_refused_at_a_chunked_loss_setting(tmp_path):
    with pytest.raises(ValueError, match="no chunked loss"):
        scale.build("smollm2", scale.SETTINGS["fp32_chunk"], "peft-lora", 4, 4, torch.device("cpu"),
                    tiny_folder=tmp_path)
    step = scale.build("smollm2", scale.SETTINGS["fp32_chunk"], "lora", 4, 4, torch.device("cpu"), tiny_folder=tmp_path)
    plain = scale.build("smollm2", scale.SETTINGS["fp32"], "lora", 4, 4, torch.device("cpu"), tiny_folder=tmp_path)
    batch = scale.random_batch("causal-lm", 2, 16, 128, "cpu")
    assert step(batch) == pytest.approx(plain(batch), abs=1e-5)  # the same loss, chunked


def test_settings_are_validated_on_construction():
    with pytest.raises(ValueError, match="precision"):
        scale.Setting("x", precision="fp8")
    with pytest.raises(ValueError, match="quantize"):
        scale.Setting("x", quantize="3bit")
    assert scale.SETTINGS["4bit_fp32_ckpt"] == scale.Setting("4bit_fp32_ckpt", "fp32", "4bit", True)


def test_the_warm_batch_is_one_short_row_of_the_batch():
    batch = scale.random_batch("causal-lm", 4, 16, 128, "cpu")
    warm = scale.short_batch(batch, tokens=8)
    assert warm["input_ids"].shape == (1, 8)
    assert torch.equal(warm["labels"], batch["labels"][:1, :8])
    cls = scale.short_batch(scale.random_batch("sequence-classification", 4, 16, 128, "cpu"))
    assert cls["labels"].shape == (1,)


def test_cli_refuses_unknown_settings_and_missing_data():
    with pytest.raises(SystemExit):
        scale_cpu.parse_args(["--smoke", "--settings", "fp64"])
    with pytest.raises(SystemExit):
        scale_cpu.parse_args(["--smoke", "--extra", "bf16:qlora"])
    with pytest.raises(SystemExit):
        scale_cpu.parse_args([])  # no --data-dir and no --smoke
