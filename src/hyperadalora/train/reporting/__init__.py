"""Experiment trackers for training runs: ``report_to = none | tensorboard | wandb | mlflow``.

A run sends every ``log.jsonl`` row (its numbers, as ``train/<key>``: ``loss``, ``task_loss``,
``regularizer``, ``lr``, ``grad_norm``, ``total_rank``, ``budget``, ``epoch``, ``step_time``, ...)
at its optimizer step, and at every evaluation the metrics (``eval/<metric>``) and the rank of
every adapted module as an image ``ranks/per_module`` (layers x module types, as
``allocation.png``). ``log.jsonl`` and ``eval.json`` stay the source of truth: the trackers get
the same records. Offline by default, inside the run directory:

* ``tensorboard``: ``RUN_DIR/tensorboard/events.out.tfevents.*`` (``tensorboard --logdir RUN_DIR``;
  ``pip install hyperadalora[tensorboard]``).
* ``wandb``: ``RUN_DIR/wandb/offline-run-*`` (``wandb sync`` uploads it; ``$WANDB_MODE=online``
  streams instead; ``pip install hyperadalora[wandb]``).
* ``mlflow``: ``RUN_DIR/mlflow.db`` and ``RUN_DIR/mlartifacts/`` (``mlflow ui --backend-store-uri
  sqlite:///RUN_DIR/mlflow.db``; ``$MLFLOW_TRACKING_URI`` sends to a server instead;
  ``pip install hyperadalora[mlflow]``). MLflow 3 refuses its ``file:`` store, so the local store
  is SQLite.

A missing package is reported before the run loads anything. Resuming (``--resume``) continues
the same tracker run, and a resumed run repeats the steps after its checkpoint with the same
values: TensorBoard hides what the interrupted process logged after the checkpoint
(``purge_step``), MLflow skips the points it already holds, so each step shows once in both;
wandb ignores a step below the one its resumed run has reached (see each reporter). Every step
up to a checkpoint is flushed with it, so a resume loses none. A new tracker is one class with
the :class:`Reporter` methods, added to :data:`REPORTER_REGISTRY`.
"""

from __future__ import annotations

from .base import NullReporter, Reporter, numeric
from .registry import REPORT_TO, REPORTER_REGISTRY, ReporterSpec, open_reporter, require_reporter

__all__ = ["NullReporter", "REPORTER_REGISTRY", "REPORT_TO", "Reporter", "ReporterSpec", "numeric", "open_reporter",
           "require_reporter"]
