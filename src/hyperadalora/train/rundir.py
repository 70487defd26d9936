"""The run directory: creating it, reading its config back, and writing its files."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..fileio import atomic_write, replace_dir
from ..fileio import write_json as write_json_file
from ..tasks import task_spec
from .config import RunConfig


def make_run_dir(config: RunConfig) -> Path:
    """Creates ``output_dir/run_name`` (a timestamped name when ``run_name`` is null)."""
    name = config.run_name or config.default_run_name(time.strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(config.output_dir).expanduser() / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} already exists and is not empty: choose another "
                              "run_name=... (or output_dir=...), or remove it")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_run_config(run_dir: Path, config: RunConfig) -> None:
    """Writes the resolved config as ``run_dir/config.yaml`` (atomically)."""
    text = config.to_yaml()
    atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))


def load_run(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The resolved config of a run directory (``config.yaml``), with overrides applied."""
    from .presets import load_run_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a hyperadalora run directory")
    return load_run_config(path, overrides)


def write_json(path: Path, data: Any) -> None:
    """Writes ``data`` as indented JSON in key order, atomically (``str`` for other values)."""
    write_json_file(Path(path), data, sort_keys=False, default=str)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Writes one JSON line per row, atomically."""
    text = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def save_adapter_dir(model, run_dir: Path) -> None:
    """Saves the adapter to ``run_dir/adapter`` as a whole: written aside, then swapped in."""
    tmp = run_dir / ".adapter.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_adapter(str(tmp))
    replace_dir(tmp, run_dir / "adapter")


def info(message: str, progress=None) -> None:
    """Prints a line on stderr (through the progress bar when one is shown)."""
    if progress is not None and not progress.disable:
        progress.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


def write_plots(run_dir: Path, config: RunConfig, log_rows: list[dict], evals: list[dict], modules: list[str],
                rank_history: list[tuple[int, list[int]]]) -> None:
    """Writes ``loss.png`` and, when ranks are recorded (AdaLoRA), ``ranks.png`` / ``ranks.json``."""
    from .plots import plot_loss, plot_rank_heatmap

    spec = task_spec(config.task)
    title = (f"{config.task} | {config.model} | {config.adapter.method}"
             f"{' (hyper)' if config.adapter.source == 'hyper' else ''} | lr {config.lr:g} | seed {config.seed}")
    if log_rows:
        plot_loss(log_rows, evals, run_dir / "loss.png", title, spec.primary_metric)
    if rank_history:
        write_json(run_dir / "ranks.json", {"modules": modules, "initial_rank": config.adapter.r,
                                            "history": [{"step": s, "ranks": r} for s, r in rank_history]})
        plot_rank_heatmap(modules, rank_history, max(1, len(log_rows)), config.adapter.r,
                          run_dir / "ranks.png", title)


__all__ = ["info", "load_run", "make_run_dir", "save_adapter_dir", "write_json", "write_jsonl", "write_plots",
           "write_run_config"]
