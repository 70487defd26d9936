"""report_to: TensorBoard, wandb (offline) and MLflow (local store) receive exactly the run's JSONL records.

Each test trains the tiny BERT of ``test_train_loop.py`` for a few steps and reads what the tracker
wrote back with the tracker's own reader (TensorBoard's ``EventAccumulator``, wandb's offline
transaction log, ``MlflowClient``), comparing it with ``log.jsonl`` / ``eval.json`` of the same run.
"""

from __future__ import annotations

import io
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hyperadalora.train import load_run, train
from hyperadalora.train.config import RunConfig
from hyperadalora.train.help import fields_help
from hyperadalora.train.plots import rank_allocation_image
from hyperadalora.train.reporting import REPORTER_REGISTRY, ReporterSpec
from hyperadalora.train.reporting.base import IDS_NAME, numeric
from test_resume import crash_run
from test_train_loop import read_jsonl, rte_config, tiny_bert_dir, write_rte
from tiny_models import tiny_bert

#: The log.jsonl columns the brief names; every numeric column is reported, these must be.
COLUMNS = ("loss", "task_loss", "regularizer", "lr", "grad_norm", "total_rank")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("reporting")
    return {"bert": tiny_bert_dir(root), "data": write_rte(root / "data")}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """The trackers' environment overrides off (the defaults under test); wandb's settings home in tmp_path."""
    for name in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def event_accumulator(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def tb_scalars(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def as_float32(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """What TensorBoard stores for a column: float32 (``simple_value``)."""
    return [(r["step"], float(np.float32(r[key]))) for r in rows]


def decode_png(data: bytes) -> np.ndarray:
    import matplotlib.image

    return (matplotlib.image.imread(io.BytesIO(data), format="png")[..., :3] * 255).round().astype(np.uint8)


def test_tensorboard_gets_the_jsonl_scalars_and_a_rank_image_per_evaluation(shared, tmp_path):
    cfg = rte_config(shared, tmp_path, "report_to=tensorboard", "steps=4", "eval_every=2")
    run = train(cfg).run_dir
    log = read_jsonl(run / "log.jsonl")
    evals = json.loads((run / "eval.json").read_text())["history"]
    acc = event_accumulator(run)
    for key in COLUMNS:
        assert tb_scalars(acc, f"train/{key}") == as_float32(log, key), key
    reported = {t[len("train/"):] for t in acc.Tags()["scalars"] if t.startswith("train/")}
    assert reported == set(numeric(log[0], ""))  # every number of the log line, nothing else
    assert tb_scalars(acc, "eval/accuracy") == as_float32(evals, "accuracy") and [e["step"] for e in evals] == [2, 4]
    images = acc.Images("ranks/per_module")
    assert [i.step for i in images] == [2, 4]
    # the last image is the final ranks (ranks.json), rendered as allocation.png renders a grid
    ranks = json.loads((run / "ranks.json").read_text())
    final = dict(zip(ranks["modules"], ranks["history"][-1]["ranks"]))
    assert sum(final.values()) == log[-1]["total_rank"] < log[0]["total_rank"]  # the allocator pruned
    expected = rank_allocation_image(final, f"step 4: rte | {cfg.model} | adalora")
    got = decode_png(images[-1].encoded_image_string)
    assert (images[-1].height, images[-1].width) == expected.shape[:2]
    np.testing.assert_array_equal(got, expected)


def test_the_held_out_loss_reaches_tensorboard_as_eval_loss(shared, tmp_path):
    run = train(rte_config(shared, tmp_path, "report_to=tensorboard", "steps=5", "eval_every=0",
                           "eval_loss_every=2")).run_dir
    log = read_jsonl(run / "log.jsonl")
    acc = event_accumulator(run)
    assert tb_scalars(acc, "eval/loss") == as_float32([r for r in log if "eval_loss" in r], "eval_loss")
    assert [s for s, _ in tb_scalars(acc, "eval/loss")] == [2, 4, 5]
    assert "train/eval_loss" not in acc.Tags()["scalars"]  # not a training value
    assert tb_scalars(acc, "train/loss") == as_float32(log, "loss")


def test_resume_shows_every_step_once_in_tensorboard(shared, tmp_path):
    overrides = ["report_to=tensorboard", "steps=7", "eval_every=3", "save_every=2"]
    run = crash_run(shared, rte_config(shared, tmp_path, *overrides), crash_step=6)  # checkpoint 4, logged to 5
    before = event_accumulator(run)
    assert [s for s, _ in tb_scalars(before, "train/loss")] == [1, 2, 3, 4, 5]
    train(load_run(run), resume=run)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per process
    acc = event_accumulator(run)
    log = read_jsonl(run / "log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 8))
    for key in COLUMNS:  # step 5 of the crashed process is purged: each step once, the resumed values
        assert tb_scalars(acc, f"train/{key}") == as_float32(log, key), key
    evals = json.loads((run / "eval.json").read_text())["history"]
    assert tb_scalars(acc, "eval/accuracy") == as_float32(evals, "accuracy") and [e["step"] for e in evals] == [3, 6, 7]
    assert [i.step for i in acc.Images("ranks/per_module")] == [3, 6, 7]


def wandb_records(path: Path) -> list:
    """The records of a wandb offline transaction log (``run-<id>.wandb``): a LevelDB-style log of
    32 KiB blocks after a 7-byte header, each chunk ``crc32 (4) | length (2) | type (1)``; types
    1 (full) and 4 (last) end a record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def wandb_history(path: Path) -> dict[int, dict]:
    """``{step: {key: value}}`` of an offline run's history records."""
    out: dict[int, dict] = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            out.setdefault(items["_step"], {}).update(items)
    return out


def test_wandb_offline_run_holds_the_jsonl_values(shared, tmp_path):
    pytest.importorskip("wandb")  # not in the test extra (pip install 'hyperadalora[wandb]')
    run = train(rte_config(shared, tmp_path, "report_to=wandb", "steps=3", "eval_every=0")).run_dir
    run_id = json.loads((run / IDS_NAME).read_text())["wandb"]
    [offline] = (run / "wandb").glob(f"offline-run-*-{run_id}")
    # wandb's service process may still be writing the last records when finish() has returned on a
    # loaded machine; wait for them (a bounded wait: a missing step still fails below).
    deadline = time.monotonic() + 60
    while sorted(history := wandb_history(offline / f"run-{run_id}.wandb")) != [1, 2, 3] and time.monotonic() < deadline:
        time.sleep(1)
    log = read_jsonl(run / "log.jsonl")
    assert sorted(history) == [1, 2, 3]
    for row in log:
        for key, value in numeric(row, "train/").items():
            assert history[row["step"]][key] == value, key  # JSON both ways: exact
    final = json.loads((run / "eval.json").read_text())["final"]
    assert history[3]["eval/accuracy"] == final["accuracy"]
    image = history[3]["ranks/per_module/path"]
    assert history[3]["ranks/per_module/_type"] == "image-file" and (offline / "files" / image).is_file()


def test_mlflow_local_store_holds_the_jsonl_values(shared, tmp_path):
    pytest.importorskip("mlflow")  # not in the test extra (pip install 'hyperadalora[mlflow]')
    from mlflow.tracking import MlflowClient

    from hyperadalora.train.reporting.mlflow_reporter import local_tracking_uri

    cfg = rte_config(shared, tmp_path, "report_to=mlflow", "steps=3", "eval_every=0")
    run = train(cfg).run_dir
    run_id = json.loads((run / IDS_NAME).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=local_tracking_uri(run))
    log = read_jsonl(run / "log.jsonl")
    for key in COLUMNS:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, f"train/{key}"))
        assert history == [(r["step"], r[key]) for r in log], key
    final = json.loads((run / "eval.json").read_text())["final"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/accuracy")] == [(3, final["accuracy"])]
    info = client.get_run(run_id)
    assert info.data.params["steps"] == "3" and info.data.params["adapter.method"] == "adalora"
    assert info.info.status == "FINISHED" and info.info.run_name == run.name
    images = [f.path for f in client.list_artifacts(run_id, "images")]
    assert any("ranks" in p and "step+3" in p and p.endswith(".png") for p in images), images
    assert any((run / "mlartifacts").rglob("*.png"))  # the artifacts stay inside the run directory


def test_mlflow_resume_keeps_one_point_per_step(shared, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from hyperadalora.train.reporting.mlflow_reporter import local_tracking_uri

    overrides = ["report_to=mlflow", "steps=5", "eval_every=0", "save_every=2"]
    run = crash_run(shared, rte_config(shared, tmp_path, *overrides), crash_step=4)  # checkpoint 2, logged to 3
    run_id = json.loads((run / IDS_NAME).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=local_tracking_uri(run))
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2, 3]
    train(load_run(run), resume=run)
    log = read_jsonl(run / "log.jsonl")
    for key in COLUMNS:  # step 3 is not logged twice; steps 4 and 5 come from the resumed process
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, f"train/{key}"))
        assert history == [(r["step"], r[key]) for r in log], key
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_missing_tracker_package_fails_before_anything_is_written(shared, tmp_path, monkeypatch):
    from hyperadalora.train.reporting.wandb_reporter import WandbReporter

    monkeypatch.setitem(REPORTER_REGISTRY, "wandb", ReporterSpec(WandbReporter, "hyperadalora_no_such_module", "wandb"))
    with pytest.raises(ModuleNotFoundError, match=r"report_to='wandb' needs .*pip install 'hyperadalora\[wandb\]'"):
        train(rte_config(shared, tmp_path, "report_to=wandb"))
    assert not (tmp_path / "run").exists()


def test_report_to_is_validated_and_documented():
    with pytest.raises(ValueError, match="report_to='neptune' is not supported; allowed values: none, tensorboard"):
        RunConfig(report_to="neptune")
    assert RunConfig().report_to == "none"
    assert RunConfig.from_yaml(RunConfig(report_to="mlflow").to_yaml()).report_to == "mlflow"
    for spec in REPORTER_REGISTRY.values():  # every registered reporter has the whole interface
        assert all(callable(getattr(spec.factory, m, None)) for m in ("log_scalars", "log_image", "flush", "close"))
        assert isinstance(spec.factory.records, bool)
    text = fields_help()
    assert "report_to (str, default 'none')" in text and "pip install hyperadalora[<name>]" in text


@pytest.mark.parametrize("source", ["direct", "hyper"])
def test_adapted_trainer_logs_reach_callbacks_with_rank_and_regulariser(tmp_path, source):
    from transformers import TrainerCallback

    import hyperadalora as ha
    from hyperadalora.integrations.trainer import AdaptedTrainer
    from test_trainer_integration import config, dataset, training_args

    class Seen(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append((state.global_step, dict(logs), sum(kwargs["model"].ranks.values()),
                              float(kwargs["model"].regularizer().detach())))

    torch.set_num_threads(1)
    model = ha.wrap(tiny_bert(), config(source))
    seen = Seen()
    args = training_args(tmp_path)
    args.logging_steps = 2
    trainer = AdaptedTrainer(model=model, args=args, train_dataset=dataset(), callbacks=[seen])
    trainer.train()
    train_logs = [(step, logs, rank, reg) for step, logs, rank, reg in seen.logs if "loss" in logs]
    assert [step for step, *_ in train_logs] == [2, 4, 6, 8]
    for step, logs, rank, reg in train_logs:  # the model's values when the callbacks ran
        assert logs["total_rank"] == rank and logs["regularizer"] == pytest.approx(reg, rel=1e-6)
    assert train_logs[-1][1]["total_rank"] < train_logs[0][1]["total_rank"]  # pruned over the run
    assert all("total_rank" not in logs for _, logs, *_ in seen.logs if "loss" not in logs)  # the summary log
