"""The ``hyperadalora`` command line: sub-commands, --help, exit codes and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hyperadalora.cli import main
from hyperadalora.train.help import describe_fields
from test_train_loop import tiny_bert_dir, tiny_llama_dir, write_instruct, write_rte

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"bert": tiny_bert_dir(root), "llama": tiny_llama_dir(root),
            "data": write_instruct(write_rte(root / "data"))}


def tiny_args(shared, out: Path, *extra: str) -> list[str]:
    return ["train", "rte_minilm_adalora", "--data-dir", str(shared["data"]), "--output-dir", str(out),
            "--no-progress", f"model={shared['bert']}", "run_name=run", "steps=3", "batch_size=4", "eval_every=0",
            "adapter.target_modules=[query,value]", "adapter.allocator.target_r=4", *extra]


def run_main(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_field_and_the_presets(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name, *_ in describe_fields():
        assert f"  {name} (" in out, name
    assert "sst2_minilm_hyperadalora" in out and "--data-dir" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in ("train", "eval", "export", "presets"))
    code, out, _ = run_main(capsys, ["presets"])
    assert code == 0 and "rte_minilm_adalora" in out.split()


def test_print_config_applies_overrides_in_any_order(capsys):
    code, out, _ = run_main(capsys, ["train", "--print-config", "sst2_minilm_adalora", "steps=40", "--data-dir",
                                     "/d", "adapter.r=10"])
    assert code == 0
    assert "steps: 40\n" in out and "data_dir: /d\n" in out and "r: 10\n" in out and "total_step: 40" in out


def test_train_eval_export_on_a_tiny_model(shared, tmp_path, capsys):
    code, out, err = run_main(capsys, tiny_args(shared, tmp_path))
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    run = Path(summary["run_dir"])
    assert run == tmp_path / "run" and summary["status"] == "completed" and summary["steps_done"] == 3
    assert summary["metrics"]["num_examples"] == 5 and "accuracy" in summary["metrics"]
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "log.jsonl", "eval.json", "predictions.jsonl",
                                               "adapter", "loss.png", "ranks.png"}
    assert "accuracy" in err and str(run) in err
    # eval: the run's adapter, written next to the run; the same accuracy as the run reported
    code, out, err = run_main(capsys, ["eval", str(run)])
    assert code == 0, err
    result = json.loads(out)
    assert result["metrics"]["accuracy"] == summary["metrics"]["accuracy"]
    assert (run / "eval-rte.json").is_file()
    code, out, _ = run_main(capsys, ["eval", str(run), "eval_rows=2", "--out", str(tmp_path / "e.json")])
    assert code == 0 and json.loads(out)["num_examples"] == 2 and (tmp_path / "e.json").is_file()
    code, _, err = run_main(capsys, ["eval", str(run), "task=alpaca"])
    assert code == 2 and "trained on a sequence-classification model" in err and "needs a causal-lm" in err
    # export: a plain peft LoRA adapter
    code, out, err = run_main(capsys, ["export", str(run), "--out", str(tmp_path / "peft")])
    assert code == 0, err
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    exported = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA" and exported["base_model_name_or_path"] == str(shared["bert"])


def test_nonfinite_loss_exits_1_with_a_clear_message(shared, tmp_path, capsys):
    code, out, err = run_main(capsys, tiny_args(shared, tmp_path, "lr=1e30", "max_grad_norm=0", "steps=6",
                                                "adapter.method=lora", "adapter.allocator=null"))
    assert code == 1
    assert "training stopped: the" in err and ("is nan" in err or "is inf" in err) and "Lower lr" in err
    assert json.loads(out)["status"] == "stopped: non-finite loss"


@pytest.mark.parametrize(("extra", "pattern"), [
    (["task=imdb"], r"RunConfig\.task='imdb' is not supported; allowed values: rte, wnli, sst2"),
    (["model=no_such_model"], r"unknown model 'no_such_model': use one of the packaged short names minilm, mpnet"),
    (["adapter.modules_to_save=[pooler_head]"],
     r"modules_to_save: 'pooler_head' matches no module.*head is classifier"),
    (["adapter.target_modules=[q_proj]"], r"matched no module"),
    (["stepz=2"], r"unknown config field 'stepz'; did you mean steps\?"),
    (["steps=-1"], r"RunConfig\.steps=-1 must be >= 1"),
])
def test_bad_inputs_exit_2_naming_the_problem(shared, tmp_path, capsys, extra, pattern):
    code, _, err = run_main(capsys, tiny_args(shared, tmp_path, *extra))
    assert code == 2
    assert "hyperadalora train: error:" in err
    import re

    assert re.search(pattern, err), err
    assert not (tmp_path / "run").exists()  # nothing is written for a bad input


def test_missing_data_dir_and_no_data_at_all(shared, tmp_path, capsys, monkeypatch):
    args = tiny_args(shared, tmp_path)
    args[args.index("--data-dir") + 1] = str(tmp_path / "nowhere")
    code, _, err = run_main(capsys, args)
    assert code == 2 and "nowhere does not exist" in err
    # no --data-dir, no env variable, no hub: both options are named
    args.remove("--data-dir")
    args.remove(str(tmp_path / "nowhere"))
    monkeypatch.delenv("HYPERADALORA_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, _, err = run_main(capsys, args)
    assert code == 2
    assert "--data-dir DIR" in err and "HYPERADALORA_DATA_DIR" in err and "datasets" in err and "hub" in err
    # the env variable is the second way
    monkeypatch.setenv("HYPERADALORA_DATA_DIR", str(shared["data"]))
    code, out, err = run_main(capsys, args + ["run_name=via_env"])
    assert code == 0, err


def test_malformed_tsv_row_names_the_line(shared, tmp_path, capsys):
    data = write_rte(tmp_path / "data")
    path = data / "rte" / "train.tsv"
    lines = path.read_text().splitlines()
    lines[3] = "2\tonly two columns"
    path.write_text("\n".join(lines) + "\n")
    args = tiny_args(shared, tmp_path)
    args[args.index("--data-dir") + 1] = str(data)
    code, _, err = run_main(capsys, args)
    assert code == 2 and f"{path}:4: expected 4 tab-separated columns, got 2" in err
    lines[3] = "2\ta\tb\tmaybe"
    path.write_text("\n".join(lines) + "\n")
    code, _, err = run_main(capsys, args)
    assert code == 2 and f"{path}:4: label 'maybe'" in err


def test_malformed_jsonl_row_names_the_line(shared, tmp_path, capsys):
    data = write_instruct(tmp_path / "data")
    path = data / "alpaca" / "train.jsonl"
    path.write_text(path.read_text() + '{"instruction": "x", "input": ""}\n{not json\n')
    args = ["train", "alpaca_smollm2_adalora", "--data-dir", str(data), "--output-dir", str(tmp_path),
            f"model={shared['llama']}", "steps=2", "progress=false"]
    code, _, err = run_main(capsys, args)
    assert code == 2 and f"{path}:7: missing field 'output'" in err
    code, _, err = run_main(capsys, ["train", "task=instruct", f"data_source={tmp_path / 'absent.jsonl'}",
                                     f"model={shared['llama']}", "--data-dir", str(data)])
    assert code == 2 and "absent.jsonl not found" in err


def test_eval_and_export_of_something_that_is_not_a_run(tmp_path, capsys):
    code, _, err = run_main(capsys, ["export", str(tmp_path)])
    assert code == 2 and "is not a run directory" in err
    code, _, err = run_main(capsys, ["eval", "rte_minilm_adalora", "--adapter", str(tmp_path), "--data-dir",
                                     str(write_rte(tmp_path / "d"))])
    assert code == 2 and "holds no adapter" in err
    code, _, err = run_main(capsys, ["train", "a_preset_that_does_not_exist"])
    assert code == 2 and "presets: " in err
    code, _, err = run_main(capsys, ["train", "rte_minilm_adalora", "sst2_minilm_adalora"])
    assert code == 2 and "at most one config" in err
    with pytest.raises(SystemExit) as info:
        main(["train", "--bogus-flag"])
    assert info.value.code == 2


def test_module_entry_point_and_console_script_declared():
    done = subprocess.run([sys.executable, "-m", "hyperadalora.cli", "presets"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "sst2_minilm_adalora" in done.stdout
    text = (ROOT / "pyproject.toml").read_text()
    assert 'hyperadalora = "hyperadalora.cli:main"' in text
