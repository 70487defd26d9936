"""The training loop: one run of a :class:`RunConfig`, written into one run directory.

Per optimizer step: ``grad_accum`` micro-batches (forward, ``loss / grad_accum`` backward), then
``model.backward_hypernetworks()`` (hyper source), gradient clipping, ``optimizer.step()``,
``model.after_step(step)`` (rank allocation; before ``zero_grad``), the scheduler step, and
one JSONL log line (with ``diverging``: true once the smoothed loss exceeds 3x its early value;
the first such step also warns on stderr). Every ``eval_every`` steps and at the end: evaluation and a checkpoint of
the adapter. Every ``save_every`` steps (0: at every evaluation), after the last step and on
Ctrl-C: a training checkpoint (``checkpoints/step-<N>/``, see :mod:`.resume`) from which
``train(config, resume=run_dir)`` continues with the same losses as an uninterrupted run.
A non-finite loss (or gradient norm) stops the run before the optimizer applies it, so the
weights are still those of the last good step: they are saved as the adapter checkpoint (the
previous one is kept if they are not finite) and :class:`~.run.NonFiniteLossError` is raised. The step itself is
:func:`~.step.optimizer_step`; the run's bookkeeping is :class:`~.run.Run`.

Run directory::

    config.yaml        the resolved config (every value explicit; loads back unchanged)
    log.jsonl          one line per optimizer step
    eval.json          final metrics, every evaluation, status, checkpoint step
    predictions.jsonl  the last evaluation's per-row predictions
    adapter/           the last good adapter (hyperadalora format: load_adapter(base, dir))
    checkpoints/       step-<N>/ training checkpoints (adapter, optimizer, RNG, ...; manifest.json)
    loss.png           loss curve (+ eval metric)
    ranks.png          rank kept per module over the steps (AdaLoRA)
    ranks.json         the same numbers (AdaLoRA)
    .lock              held (fcntl.flock) by the process running in the directory; holds its pid
    tensorboard/ wandb/ mlflow.db mlartifacts/ reporter_ids.json
                       what ``report_to`` writes (see :mod:`.reporting`); the same records as above
"""

from __future__ import annotations

from pathlib import Path

from .config import RunConfig
from .run import Run, RunResult


def train(config: RunConfig, *, base_model=None, tokenizer=None, resume: str | Path | None = None) -> RunResult:
    """Trains and evaluates one run; returns its :class:`RunResult`.

    Args:
        config: The run. When resuming, the run's ``config.yaml`` (:func:`~hyperadalora.train.load_run`) with at
            most the overrides listed in :data:`~hyperadalora.train.resume.RESUME_SAFE_FIELDS`.
        base_model: Optionally an already loaded base model (with ``tokenizer``) instead of
            loading ``config.model``; it is modified in place.
        tokenizer: Its tokenizer.
        resume: A run directory to continue in: the newest training checkpoint whose files
            match its manifest (``checkpoints/step-<N>``) is loaded (adapter, allocator,
            optimizer, scheduler, RNG states, data position, loss EMA, rank history), the lines of
            ``log.jsonl`` after step ``N`` are dropped, and the run goes on as if it had never
            stopped (the same losses as an uninterrupted run).

    Raises:
        ValueError / FileNotFoundError: Bad task, model or data (before anything is written).
            When resuming: a config that differs in a field that changes the run, other
            training rows, a completed run, no training checkpoint, or a ``config.yaml``
            that differs from the config stored in the checkpoint (edited by hand).
        CorruptCheckpointError: When resuming, no checkpoint of the run verifies (a newer
            corrupt one next to a good one is only skipped, with a warning on stderr).
        FileExistsError: The run directory exists and is not empty (new runs).
        RunDirBusyError: Another process runs in the run directory (it holds ``RUN_DIR/.lock``).
        OutputWriteError: The output directory cannot be written (checked before anything is
            loaded), or a write failed during the run (the message says what the directory keeps).
        NonFiniteLossError: The loss became NaN / inf; the run directory is complete and holds
            the last good adapter.
        KeyboardInterrupt: Ctrl-C; the log, plots, ``eval.json`` (status ``interrupted``), the
            adapter and a training checkpoint of the last completed step are written first.
    """
    return Run(config, base_model=base_model, tokenizer=tokenizer, resume=resume).run()


__all__ = ["train"]
