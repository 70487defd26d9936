"""``report_to=tensorboard``: event files in ``RUN_DIR/tensorboard/`` (``tensorboard --logdir RUN_DIR``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

SUBDIR = "tensorboard"


class TensorBoardReporter:
    """Writes scalars and images through ``torch.utils.tensorboard.SummaryWriter``.

    A resumed run (from the checkpoint of step ``N``) opens its writer with ``purge_step=N + 1``:
    TensorBoard then hides whatever the interrupted process logged after step ``N`` (the resumed
    run logs those steps again), so every step shows once and nothing before ``N`` is lost.

    Args:
        run_dir: The run directory (event files go to ``run_dir/tensorboard``).
        run_name: Unused (TensorBoard names runs by folder).
        config: The resolved run config (written as a text summary once, for a new run).
        resume_step: The checkpoint step a resumed run continues after; None for a new run.
    """

    records = True

    def __init__(self, run_dir: Path, run_name: str, config: Mapping[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        del run_name
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / SUBDIR), purge_step=purge, flush_secs=30)
        if resume_step is None:
            import yaml

            text = yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=None)
            self.writer.add_text("config", "```\n" + text + "```", 0)  # markdown code block: one line per field

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        self.writer.add_image(name, image, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


__all__ = ["SUBDIR", "TensorBoardReporter"]
