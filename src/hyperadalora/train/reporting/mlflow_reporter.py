"""``report_to=mlflow``: an MLflow run, in a SQLite store inside the run directory by default."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .base import flatten, remembered_id

STORE_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def local_tracking_uri(run_dir: Path) -> str:
    """``sqlite:///RUN_DIR/mlflow.db``: MLflow's local store (its ``file:`` store is refused by MLflow 3)."""
    return f"sqlite:///{Path(run_dir).absolute() / STORE_NAME}"


class MlflowReporter:
    """Logs to an MLflow run through ``MlflowClient`` (no global MLflow state is touched).

    The tracking URI is ``$MLFLOW_TRACKING_URI`` when set, else :func:`local_tracking_uri` with the
    artifacts (images) in ``RUN_DIR/mlartifacts`` (``mlflow ui --backend-store-uri
    sqlite:///RUN_DIR/mlflow.db`` shows it). The experiment is ``$MLFLOW_EXPERIMENT_NAME``, else
    ``hyperadalora``; the run is named after the run directory and its id kept in
    ``RUN_DIR/reporter_ids.json``, so a resumed run continues the same MLflow run. MLflow keeps
    every value it receives, so a resumed run (from the checkpoint of step ``N``) skips the
    ``(metric, step)`` points after ``N`` that the interrupted process already logged: a resume
    repeats them with the same values, and each step stays once in the metric history. Images
    are not deduplicated (a rank image of such a step may appear twice among the artifacts).

    Args:
        run_dir: The run directory.
        run_name: The MLflow run's name.
        config: The resolved run config (logged as parameters, dotted, by a new run).
        resume_step: The checkpoint step a resumed run continues after; None for a new run.
    """

    records = True

    def __init__(self, run_dir: Path, run_name: str, config: Mapping[str, Any], resume_step: int | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        remote = os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(tracking_uri=remote or local_tracking_uri(run_dir))
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "hyperadalora")
        experiment = self.client.get_experiment_by_name(name)
        artifacts = None if remote else (Path(run_dir).absolute() / ARTIFACTS_DIR).as_uri()
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(name, artifact_location=artifacts))
        self.run_id = remembered_id(run_dir, "mlflow", lambda: self.client.create_run(
            experiment_id, run_name=run_name).info.run_id)
        if resume_step is None:  # parameters are write-once in MLflow: a resume does not log them again
            params = [Param(k, str(v)) for k, v in flatten(config).items()]
            self.client.log_batch(self.run_id, params=params)
        self.logged: set[tuple[str, int]] = set()
        if resume_step is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            self.logged = self._points_after(resume_step)

    def _points_after(self, step: int) -> set[tuple[str, int]]:
        """The ``(metric, step)`` points after ``step`` already in the run (logged by a process that stopped)."""
        keys = self.client.get_run(self.run_id).data.metrics
        return {(key, m.step) for key in keys for m in self.client.get_metric_history(self.run_id, key)
                if m.step > step}

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items() if (k, step) not in self.logged]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        self.client.log_image(self.run_id, image, key=name, step=step)

    def flush(self) -> None:
        pass  # every call above is written when it returns

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


__all__ = ["ARTIFACTS_DIR", "MlflowReporter", "STORE_NAME", "local_tracking_uri"]
