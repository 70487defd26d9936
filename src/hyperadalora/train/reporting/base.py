"""The reporter interface: what a run sends to an experiment tracker, and the shared helpers."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ...fileio import atomic_write

#: File in the run directory holding each tracker's run id, so a resumed run continues the same tracker run.
IDS_NAME = "reporter_ids.json"


@runtime_checkable
class Reporter(Protocol):
    """Receives a run's records; ``log.jsonl`` / ``eval.json`` stay the source of truth.

    Attributes:
        records: False for the reporter that drops everything (``none``): the run then skips
            rendering images for it.
    """

    records: bool

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Records ``{tag: value}`` at optimizer step ``step`` (1-based, as in ``log.jsonl``)."""

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        """Records an ``(height, width, 3)`` uint8 RGB image under ``name`` at ``step``."""

    def flush(self) -> None:
        """Puts everything recorded so far on disk (called with every training checkpoint)."""

    def close(self) -> None:
        """Flushes and ends the tracker run (called once, when the run ends for any reason)."""


class NullReporter:
    """``report_to=none``: records nothing (the run's own files are written as always)."""

    records = False

    def __init__(self, run_dir: Path | None = None, run_name: str = "", config: Mapping[str, Any] | None = None,
                 resume_step: int | None = None) -> None:
        del run_dir, run_name, config, resume_step  # nothing to open

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        pass

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def numeric(values: Mapping[str, Any], prefix: str, skip: tuple[str, ...] = ("step",)) -> dict[str, float]:
    """``{prefix + key: float}`` for the finite numbers of a record (None, bools, text and ``skip`` left out).

    Args:
        values: A ``log.jsonl`` row or an evaluation's metrics.
        prefix: Tag prefix, e.g. ``"train/"``.
        skip: Keys never reported (the step is the x axis, not a value).
    """
    out = {}
    for key, value in values.items():
        if key in skip or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[prefix + key] = float(value)
    return out


def remembered_id(run_dir: Path, tracker: str, new_id: Callable[[], str]) -> str:
    """The tracker run id stored in ``RUN_DIR/reporter_ids.json`` (a resumed run reuses it), else ``new_id()``,
    stored there."""
    path = Path(run_dir) / IDS_NAME
    ids = json.loads(path.read_text()) if path.is_file() else {}
    if tracker not in ids:
        ids[tracker] = new_id()
        text = json.dumps(ids, indent=2) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return ids[tracker]


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"adapter": {"r": 8}}`` -> ``{"adapter.r": 8}`` (trackers' flat parameter tables)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


__all__ = ["IDS_NAME", "NullReporter", "Reporter", "flatten", "numeric", "remembered_id"]
