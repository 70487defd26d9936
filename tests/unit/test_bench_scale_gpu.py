"""The GPU benchmark's CPU-checkable parts (issue 23, item 7): the random-weights stand-in of a packaged
architecture, the per-configuration error and time-budget handling, its table, and the carried wheel's cut."""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from hyperadalora.bench import scale
from hyperadalora.bench.experiments import scale_gpu

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "gpu" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_architecture(folder: Path) -> Path:
    """A tiny Llama's config beside real weights that must not be read."""
    config = LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=48)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_random_weights_folder_has_the_architecture_and_fresh_weights(tmp_path):
    arch = _tiny_architecture(tmp_path / "arch")
    (arch / "tokenizer_config.json").write_text("{}")
    source = LlamaForCausalLM.from_pretrained(arch)
    out = scale.random_weights_folder(arch, "causal-lm", tmp_path / "random", seed=3)
    model = LlamaForCausalLM.from_pretrained(out)
    def config(folder):
        return {k: v for k, v in AutoConfig.from_pretrained(folder).to_dict().items() if k != "_name_or_path"}

    assert config(out) == config(arch)
    assert (out / "tokenizer_config.json").is_file()  # the tokenizer files travel with it
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in source.state_dict().items()}
    weight = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(model.state_dict()[weight], source.state_dict()[weight])
    again = scale.random_weights_folder(arch, "causal-lm", tmp_path / "again", seed=3)
    assert torch.equal(LlamaForCausalLM.from_pretrained(again).state_dict()[weight], model.state_dict()[weight])


def test_random_weights_folder_needs_a_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        scale.random_weights_folder(tmp_path, "causal-lm", tmp_path / "out")


@pytest.mark.slow
def test_smoke_run_measures_and_a_failing_configuration_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERADALORA_BENCHMARKS", str(tmp_path))
    real = scale_gpu.measure

    def failing_peft(name, base, variant, args, folder):
        if variant == "peft-lora":
            raise RuntimeError("planted failure")
        return real(name, base, variant, args, folder)

    monkeypatch.setattr(scale_gpu, "measure", failing_peft)
    rc = scale_gpu.main(["--smoke", "--models", "smollm2", "--bases", "bf16", "--variants", "lora,peft-lora",
                         "--chunk-bases", "", "--name", "smoke"])
    rows = json.loads((tmp_path / "results" / "smoke.json").read_text())["rows"]
    assert rc == 1 and [r["variant"] for r in rows] == ["lora", "peft-lora"]
    assert rows[0]["tokens_per_s"] == pytest.approx(4 * 16 * 2 / rows[0]["seconds"])
    assert torch.isfinite(torch.tensor(rows[0]["final_loss"]))
    assert rows[1]["error"] == "RuntimeError: planted failure"
    assert "planted failure" in (tmp_path / "results" / "smoke.md").read_text()


def test_past_the_budget_configurations_are_skipped_not_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERADALORA_BENCHMARKS", str(tmp_path))
    monkeypatch.setattr(scale_gpu, "measure", lambda *a: pytest.fail("measured past the budget"))
    rc = scale_gpu.main(["--smoke", "--budget-s", "1e-12", "--models", "mpnet", "--bases", "bf16,4bit",
                         "--variants", "lora", "--name", "skipped"])
    rows = json.loads((tmp_path / "results" / "skipped.json").read_text())["rows"]
    assert rc == 0 and [(r["base"], r["skipped"]) for r in rows] == [("bf16", "past --budget-s"),
                                                                      ("4bit", "past --budget-s")]


def test_random_weights_needs_each_models_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYPERADALORA_BENCHMARKS", str(tmp_path))
    assert scale_gpu.main(["--smoke", "--random-weights", str(tmp_path), "--models", "smollm2"]) == 2
    assert "smollm2/config.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()  # refused before anything was written


def test_the_table_compares_each_of_ours_with_its_peft_twin():
    row = {"model": "mpnet", "base": "4bit", "final_loss": 0.5, "seconds": 1.0}
    rows = [{**row, "variant": "adalora", "tokens_per_s": 300.0, "peak_gib": 3.0},
            {**row, "variant": "hyperadalora", "tokens_per_s": 100.0, "peak_gib": 4.5},
            {**row, "variant": "peft-adalora", "tokens_per_s": 200.0, "peak_gib": 6.0},
            {**row, "variant": "lora", "error": "ValueError: no"}]
    env = {"device": "GPU", "batch": 2, "seq": 8, "r": 4, "warmup": 1, "steps": 2, "weights": "random"}
    lines = scale_gpu.render({"environment": env, "rows": rows})
    cells = {line.split(" | ")[2]: line.split(" | ") for line in lines if line.startswith("| mpnet")}
    assert cells["adalora"][4:7] == ["1.50", "3.00", "0.500"]  # 300 / 200 tokens/s, 3 / 6 GiB
    assert cells["hyperadalora"][4:7] == ["0.50", "4.50", "0.750"]
    assert cells["lora"][-1] == "ValueError: no |"


def test_the_carried_bitsandbytes_wheel_keeps_only_the_cpu_and_one_cuda_major(tmp_path):
    carry = _script("carry")
    wheel = tmp_path / "bitsandbytes-0-py3-none-any.whl"
    names = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda118.so",
             "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cuda132.so",
             "bitsandbytes/libbitsandbytes_rocm64.so", "bitsandbytes/libbitsandbytes_xpu2025.so"]
    with zipfile.ZipFile(wheel, "w") as z:
        for n in names:
            z.writestr(n, n)
        z.writestr("bitsandbytes-0.dist-info/RECORD", "".join(f"{n},sha256=x,1\n" for n in names))
    carry.strip_libraries(wheel, "13")
    kept = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so",
            "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cuda132.so"]
    with zipfile.ZipFile(wheel) as z:
        assert z.namelist() == [*kept, "bitsandbytes-0.dist-info/RECORD"]
        assert [line.split(",")[0] for line in z.read("bitsandbytes-0.dist-info/RECORD").decode().splitlines()] == kept
        assert z.read(kept[2]) == kept[2].encode()


def test_carry_reads_the_projects_pins():
    carry = _script("carry")
    pins = carry.pinned_versions(ROOT / "pyproject.toml")
    text = (ROOT / "pyproject.toml").read_text()
    assert set(pins) == {"transformers", "peft", "bitsandbytes"}
    assert all(f'"{n}=={v}"' in text for n, v in pins.items())


def test_results_record_the_quantisation_librarys_version():
    bnb = pytest.importorskip("bitsandbytes")
    import peft

    from hyperadalora.bench.report import versions

    recorded = versions()
    assert recorded["bitsandbytes"] == bnb.__version__ and recorded["peft"] == peft.__version__
