"""The run directory: creating it, reading its config back, and writing its files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..adapter_io import save_adapter
from ..fileio import atomic_write, replace_dir
from ..fileio import write_json as write_json_file
from ..tasks import task_spec
from .config import RunConfig


LOCK_NAME = ".lock"


class RunDirBusyError(RuntimeError):
    """Another process holds the run directory's lock (it is training or resuming in it)."""


class OutputWriteError(OSError):
    """Writing into the output / run directory failed (read-only, full disk, ...).

    The message names the directory, the error and what the run directory still holds.
    """


class RunDirLock:
    """An exclusive ``fcntl.flock`` on ``RUN_DIR/.lock`` (which holds the owner's pid).

    The lock lives as long as the open file: :meth:`release` (or the process's end) frees it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunDirLock:
        """Takes the lock; raises :class:`RunDirBusyError` naming the holder's pid when it is taken."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirBusyError(f"run directory {self.path.parent} is in use by pid {holder} (it holds "
                                  f"{self.path}): wait for that run to end, or use another run_name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Frees the lock (the file stays: removing it would race with a waiting process)."""
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def check_writable(directory: str | Path) -> None:
    """Raises :class:`OutputWriteError` unless files can be created in ``directory`` (or, when it
    does not exist yet, in its nearest existing parent, where it would be created)."""
    target = Path(directory).expanduser().absolute()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputWriteError(f"cannot create {target}: {probe} is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".hyperadalora-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise OutputWriteError(f"cannot write into {probe} (needed for {target}): {exc.strerror or exc}; choose a "
                               "writable output_dir / --output-dir") from exc


def make_run_dir(config: RunConfig) -> tuple[Path, RunDirLock]:
    """Creates ``output_dir/run_name`` (a timestamped name when ``run_name`` is null) and locks it.

    The folder is created with ``os.mkdir`` (an existing empty one is accepted) and checked for
    emptiness only once its lock is held, so two processes never both accept one directory.

    Returns:
        The run directory and its held :class:`RunDirLock` (release it when the run ends).
    """
    name = config.run_name or config.default_run_name(time.strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(config.output_dir).expanduser() / name
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(run_dir)
    except FileExistsError:
        if not run_dir.is_dir():
            raise FileExistsError(f"{run_dir} exists and is not a folder: choose another run_name=...") from None
    lock = RunDirLock(run_dir).acquire()
    if any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        lock.release()
        raise FileExistsError(f"run directory {run_dir} already exists and is not empty: choose another "
                              "run_name=... (or output_dir=...), or remove it")
    return run_dir, lock


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


def save_adapter_dir(model, run_dir: Path, tensors: dict | None = None) -> None:
    """Saves the adapter to ``run_dir/adapter`` as a whole: written aside, then swapped in
    (``tensors``: the whole adapter tensors of a sharded model, gathered; default the model's own)."""
    tmp = run_dir / ".adapter.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_adapter(model, tmp, tensors=tensors)
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


__all__ = ["LOCK_NAME", "OutputWriteError", "RunDirBusyError", "RunDirLock", "check_writable", "info", "load_run",
           "make_run_dir", "save_adapter_dir", "write_json", "write_jsonl", "write_plots",
           "write_run_config"]
