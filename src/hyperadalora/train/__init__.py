"""Training runs: the run config, the loop, the schedule, plots (``hyperadalora train``)."""

from ..fileio import CorruptCheckpointError, verify_checkpoint
from .config import RunConfig, fields_help, list_presets, load_run_config
from .loop import NonFiniteLossError, RunResult, evaluate_run, load_run, load_trained, train
from .schedule import make_scheduler, warmup_cosine

__all__ = ["CorruptCheckpointError", "NonFiniteLossError", "RunConfig", "RunResult", "evaluate_run", "fields_help",
           "list_presets", "load_run", "load_run_config", "load_trained", "make_scheduler", "train", "verify_checkpoint",
           "warmup_cosine"]
