"""The reporters by name (``RunConfig.report_to``): the one place that maps a name to a tracker."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import NullReporter, Reporter
from .mlflow_reporter import MlflowReporter
from .tensorboard_reporter import TensorBoardReporter
from .wandb_reporter import WandbReporter


@dataclass(frozen=True)
class ReporterSpec:
    """A reporter and what it needs.

    Attributes:
        factory: The class, called as ``factory(run_dir, run_name, config, resume_step)``.
        package: The module it imports (None: nothing beyond hyperadalora's own dependencies).
        extra: The ``pip install hyperadalora[<extra>]`` extra that installs ``package``.
    """

    factory: type
    package: str | None = None
    extra: str | None = None


REPORTER_REGISTRY: dict[str, ReporterSpec] = {
    "none": ReporterSpec(NullReporter),
    "tensorboard": ReporterSpec(TensorBoardReporter, "tensorboard", "tensorboard"),
    "wandb": ReporterSpec(WandbReporter, "wandb", "wandb"),
    "mlflow": ReporterSpec(MlflowReporter, "mlflow", "mlflow"),
}

#: The accepted values of ``RunConfig.report_to``.
REPORT_TO = tuple(REPORTER_REGISTRY)


def require_reporter(name: str) -> None:
    """Raises ``ModuleNotFoundError`` naming the ``pip install`` that fixes it when ``name``'s package is missing.

    Run before anything is loaded or written, so a missing tracker fails a run at once.
    """
    if name not in REPORTER_REGISTRY:
        raise ValueError(f"report_to={name!r} is not a reporter; choose one of {', '.join(REPORT_TO)}")
    spec = REPORTER_REGISTRY[name]
    if spec.package is not None and importlib.util.find_spec(spec.package) is None:
        raise ModuleNotFoundError(f"report_to={name!r} needs the {spec.package!r} package, which is not installed: "
                                  f"pip install 'hyperadalora[{spec.extra}]' (or set report_to=none)",
                                  name=spec.package)


def open_reporter(name: str, run_dir: str | Path, run_name: str, config: Mapping[str, Any],
                  resume_step: int | None = None) -> Reporter:
    """Opens reporter ``name`` for a run directory.

    Args:
        name: A key of :data:`REPORTER_REGISTRY` (``RunConfig.report_to``).
        run_dir: The run directory (offline trackers write inside it).
        run_name: The run's name (the tracker run's display name).
        config: The resolved run config as a mapping.
        resume_step: For a resumed run, the checkpoint step it continues after; None for a new run.
    """
    require_reporter(name)
    return REPORTER_REGISTRY[name].factory(Path(run_dir), run_name, config, resume_step)


__all__ = ["REPORTER_REGISTRY", "REPORT_TO", "ReporterSpec", "open_reporter", "require_reporter"]
