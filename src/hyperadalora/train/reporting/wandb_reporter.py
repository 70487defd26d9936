"""``report_to=wandb``: a Weights & Biases run, offline by default, in ``RUN_DIR/wandb/``."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .base import remembered_id


class WandbReporter:
    """Logs to a ``wandb`` run in ``RUN_DIR/wandb/`` (``offline-run-*``; upload later with ``wandb sync``).

    The mode is ``$WANDB_MODE`` when set (``online`` streams to the server), else ``offline``; the
    project is ``$WANDB_PROJECT``, else ``hyperadalora``; the run is named after the run directory.
    The wandb run id is kept in ``RUN_DIR/reporter_ids.json``, so a resumed run continues the same
    wandb run (``resume="allow"``). wandb ignores a step below the one the resumed run has reached
    (``wandb sync`` uploads the offline folders in turn), so the steps the interrupted process
    logged after its checkpoint keep that process's values, the same ones a resume repeats.

    Args:
        run_dir: The run directory.
        run_name: The wandb run's display name.
        config: The resolved run config (the wandb run's config).
        resume_step: The checkpoint step a resumed run continues after; None for a new run.
    """

    records = True

    def __init__(self, run_dir: Path, run_name: str, config: Mapping[str, Any], resume_step: int | None) -> None:
        import wandb

        del resume_step  # wandb resumes by run id
        self.wandb = wandb
        run_id = remembered_id(run_dir, "wandb", lambda: uuid.uuid4().hex[:12])
        settings = wandb.Settings(console="off", silent=True, disable_git=True, x_disable_stats=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "hyperadalora"), name=run_name, id=run_id,
                              dir=str(run_dir), mode=os.environ.get("WANDB_MODE", "offline"), config=dict(config),
                              resume="allow", reinit="create_new", settings=settings)

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        self.run.log({name: self.wandb.Image(image)}, step=step)

    def flush(self) -> None:
        pass  # wandb's service process writes as it receives

    def close(self) -> None:
        self.run.finish()


__all__ = ["WandbReporter"]
