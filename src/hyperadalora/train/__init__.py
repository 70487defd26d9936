"""Training runs: the run config, the loop, the schedule, plots (``hyperadalora train``)."""

from ..fileio import CorruptCheckpointError, verify_checkpoint
from .build import build_model
from .config import RunConfig
from .evaluate import evaluate_run, load_trained
from .help import fields_help
from .loop import train
from .presets import list_presets, load_run_config
from .run import NonFiniteLossError, Run, RunResult
from .rundir import OutputWriteError, RunDirBusyError, load_run
from .schedule import make_scheduler, warmup_cosine
from .step import StepStats, optimizer_step

__all__ = ["CorruptCheckpointError", "NonFiniteLossError", "OutputWriteError", "Run", "RunConfig", "RunDirBusyError",
           "RunResult", "StepStats", "build_model", "evaluate_run", "fields_help", "list_presets", "load_run",
           "load_run_config", "load_trained", "make_scheduler", "optimizer_step", "train", "verify_checkpoint",
           "warmup_cosine"]
