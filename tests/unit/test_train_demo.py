"""``make demo`` (hyperadalora.demo) end to end on a tiny BERT with tiny SST-2 files."""

from __future__ import annotations

import json

import pytest

from hyperadalora.demo import checkpoints, main
from test_train_loop import tiny_bert_dir


def test_checkpoints():
    assert checkpoints(250) == [1, 50, 100, 150, 200, 250]
    assert checkpoints(3) == [1, 2, 3]


def test_demo_runs_both_methods_and_prints_the_table(tmp_path, capsys):
    (tmp_path / "data" / "sst2").mkdir(parents=True)
    rows = [("it was good ", 1), ("an awful movie ", 0), ("great fun ", 1), ("boring film ", 0)]
    for split, n in (("train", 16), ("dev", 6)):
        lines = ["sentence\tlabel"] + [f"{t}\t{lab}" for t, lab in (rows * 4)[:n]]
        (tmp_path / "data" / "sst2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    model = tiny_bert_dir(tmp_path)
    code = main(["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "demo"), "--no-progress",
                 f"model={model}", "steps=4", "batch_size=4", "adapter.hyper.hidden=16"])
    assert code == 0
    out = capsys.readouterr().out
    assert "AdaLoRA" in out and "HyperAdaLoRA" in out
    for label in ("task loss (smoothed) @ 1", "task loss (smoothed) @ 4", "dev accuracy (6 rows)",
                  "step time (s, mean)", "final total rank"):
        assert label in out
    demo = tmp_path / "demo"
    assert (demo / "loss_overlay.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((demo / "summary.json").read_text())
    assert set(summary["runs"]) == {"AdaLoRA", "HyperAdaLoRA"}
    for name in ("adalora", "hyperadalora"):
        assert (demo / name / "eval.json").is_file() and (demo / name / "ranks.png").is_file()
    hyper_cfg = (demo / "hyperadalora" / "config.yaml").read_text()
    assert "source: hyper" in hyper_cfg and "source: direct" in (demo / "adalora" / "config.yaml").read_text()
    # same seed, same data order: the first step sees the same rows with the same head (the adapters
    # start near a zero update in both), so the first task losses are (nearly) equal
    logs = [[json.loads(x) for x in (demo / n / "log.jsonl").read_text().splitlines()]
            for n in ("adalora", "hyperadalora")]
    assert logs[0][0]["task_loss"] == pytest.approx(logs[1][0]["task_loss"], rel=0.02)


def test_demo_survives_a_run_that_diverges(tmp_path, capsys, monkeypatch):
    from hyperadalora import demo
    from hyperadalora.train import NonFiniteLossError, RunResult

    real_train = demo.train

    def diverging(config):
        result = real_train(config)
        if config.adapter.source == "hyper":
            stopped = RunResult(result.run_dir, config, "stopped: non-finite loss", 2, None, [], result.log[:2], 2)
            raise NonFiniteLossError("training stopped: the loss is nan at step 3", stopped)
        return result

    monkeypatch.setattr(demo, "train", diverging)
    (tmp_path / "data" / "sst2").mkdir(parents=True)
    for split in ("train", "dev"):
        (tmp_path / "data" / "sst2" / f"{split}.tsv").write_text("sentence\tlabel\ngood fun \t1\nawful \t0\n")
    assert main(["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "demo"), "--no-progress",
                 f"model={tiny_bert_dir(tmp_path)}", "steps=3", "batch_size=2", "adapter.hyper.hidden=16"]) == 0
    captured = capsys.readouterr()
    assert "loss is nan at step 3" in captured.err
    status = [line for line in captured.out.splitlines() if line.startswith("status")]
    assert status and "completed" in status[0] and "stopped" in status[0]
