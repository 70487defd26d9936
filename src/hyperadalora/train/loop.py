"""The training loop: one run of a :class:`RunConfig`, written into one run directory.

Per optimizer step: ``grad_accum`` micro-batches (forward, ``loss / grad_accum`` backward), then
``model.backward_hypernetworks()`` (hyper source), gradient clipping, ``optimizer.step()``,
``model.after_step(step)`` (rank allocation; before ``zero_grad``), the scheduler step, and
one JSONL log line. Every ``eval_every`` steps and at the end: evaluation and a checkpoint of
the adapter. Every ``save_every`` steps (0: at every evaluation), after the last step and on
Ctrl-C: a training checkpoint (``checkpoints/step-<N>/``, see :mod:`.resume`) from which
``train(config, resume=run_dir)`` continues with the same losses as an uninterrupted run.
A non-finite loss (or gradient norm) stops the run before the optimizer applies it, so the
weights are still those of the last good step: they are saved as the adapter checkpoint (the
previous one is kept if they are not finite) and :class:`NonFiniteLossError` is raised.

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
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapted_model import AdaptedModel, wrap
from ..fileio import atomic_write, replace_dir
from ..fileio import write_json as write_json_file
from ..tasks import HUB, Task, make_task, resolve_data, task_spec
from .config import RunConfig
from .resume import (CHECKPOINTS_DIR, check_resume_config, checkpoint_dirs, data_fingerprint,
                     find_resume_checkpoint, load_training_checkpoint, rng_snapshot, save_training_checkpoint,
                     truncate_log)
from .schedule import make_scheduler
from .step import optimizer_step


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the run stopped.

    Attributes:
        result: The :class:`RunResult` of the stopped run (its directory is complete).
    """

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class RunResult:
    """What a run produced."""

    run_dir: Path
    config: RunConfig
    status: str
    steps_done: int
    final_metrics: dict[str, Any] | None
    evals: list[dict[str, Any]] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_step: int | None = None
    seconds: float = 0.0
    resumed_from_step: int | None = None

    @property
    def primary_metric(self) -> str:
        return task_spec(self.config.task).primary_metric


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed)


def batch_order(n_rows: int, batch_size: int, seed: int):
    """Yields lists of row indices forever: a fresh seeded permutation per epoch.

    An epoch's incomplete last batch is dropped (unless there are fewer rows than one batch),
    so every micro-batch has the same size and the order depends only on ``seed``.
    """
    if n_rows < 1:
        raise ValueError("no training rows")
    gen = torch.Generator().manual_seed(seed)
    size = min(batch_size, n_rows)
    while True:
        perm = torch.randperm(n_rows, generator=gen).tolist()
        for start in range(0, n_rows - size + 1, size):
            yield perm[start:start + size]


def load_base_model(config: RunConfig):
    """``(model, tokenizer)`` for the run's model and task (head size from the task)."""
    from ..models import load_model

    spec = task_spec(config.task)
    return load_model(config.model, task=spec.model_task, num_labels=max(spec.num_labels, 1))


def finalize_adapter_config(config: RunConfig, model: torch.nn.Module) -> RunConfig:
    """Adds the classification head to ``adapter.modules_to_save`` when none is listed.

    A fresh head that is not trained would make a classifier guess, so for sequence
    classification the head (``classifier`` for BERT-likes, ``score`` for decoder models) must
    train; a listed module that matches nothing raises, naming the candidates.
    """
    spec = task_spec(config.task)
    names = [n for n, _ in model.named_modules()]

    def matches(target: str) -> bool:
        return any(n == target or n.endswith("." + target) for n in names)

    saved = config.adapter.modules_to_save
    for target in saved:
        if not matches(target):
            heads = [h for h in ("classifier", "score", "lm_head") if matches(h)]
            raise ValueError(f"adapter.modules_to_save: {target!r} matches no module of {config.model}; "
                             f"this model's head is {', '.join(heads) or 'unknown'}")
    if spec.model_task == "sequence-classification" and not saved:
        head = next((h for h in ("classifier", "score") if matches(h)), None)
        if head is None:
            raise ValueError(f"{config.model} has no 'classifier' or 'score' head: set adapter.modules_to_save "
                             "to its classification head so that it trains")
        adapter = config.adapter.to_dict()
        adapter["modules_to_save"] = [head]
        return config.replace(adapter=adapter)
    return config


def build_model(config: RunConfig, base_model=None, tokenizer=None) -> tuple[AdaptedModel, Any, RunConfig]:
    """The run's base model wrapped with its adapter, seeded as every run is.

    Seeds every generator with ``config.seed``, loads the base model (unless given), adds the
    classification head to ``modules_to_save`` (:func:`finalize_adapter_config`), re-seeds torch
    and wraps: the adapter's initial factors depend only on the config.

    Returns:
        ``(model, tokenizer, config)``, ``config`` with the finalized adapter.
    """
    seed_everything(config.seed)
    if base_model is None:
        base_model, tokenizer = load_base_model(config)
    config = finalize_adapter_config(config, base_model)
    torch.manual_seed(config.seed)
    return wrap(base_model, config.adapter), tokenizer, config


def evaluate_rows(task: Task, model: AdaptedModel | torch.nn.Module, rows) -> tuple[dict, list[dict]]:
    """Runs ``task.evaluate`` in eval mode and restores the model's mode; adds ``seconds``."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        metrics, predictions = task.evaluate(model, rows)
    finally:
        model.train(was_training)
    metrics = dict(metrics)
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    return metrics, predictions


def _write_json(path: Path, data: Any) -> None:
    write_json_file(Path(path), data, sort_keys=False, default=str)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def save_checkpoint(model: AdaptedModel, run_dir: Path) -> None:
    """Saves the adapter to ``run_dir/adapter`` as a whole: written aside, then swapped in."""
    tmp = run_dir / ".adapter.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_adapter(str(tmp))
    replace_dir(tmp, run_dir / "adapter")


def _all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def _info(message: str, progress) -> None:
    if progress is not None and not progress.disable:
        progress.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


def make_run_dir(config: RunConfig) -> Path:
    """Creates ``output_dir/run_name`` (a timestamped name when ``run_name`` is null)."""
    name = config.run_name or config.default_run_name(time.strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(config.output_dir).expanduser() / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} already exists and is not empty: choose another "
                              "run_name=... (or output_dir=...), or remove it")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _prepare_resume(run_dir: Path) -> tuple[RunConfig, Path]:
    """The resumed run's saved config and the newest checkpoint that verifies (nothing loaded yet)."""
    saved = load_run(run_dir)
    info_path = run_dir / "eval.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
        except ValueError:
            info = {}
        if isinstance(info, dict) and info.get("status") == "completed" and info.get("final") is not None:
            raise ValueError(f"{run_dir} already completed its {saved.steps} steps (see its eval.json); nothing to "
                             "resume: start a new run (or `hyperadalora eval` it)")
    return saved, find_resume_checkpoint(run_dir)


def _set_aside_after(run_dir: Path, step: int) -> None:
    """Before a resumed run writes checkpoints again: leftovers of interrupted writes are removed and
    checkpoints newer than ``step`` (they failed verification) are renamed ``corrupt-step-<N>``."""
    root = run_dir / CHECKPOINTS_DIR
    for leftover in root.glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for n, folder in checkpoint_dirs(run_dir):
        if n > step:
            aside = root / f"corrupt-{folder.name}"
            if aside.exists():
                shutil.rmtree(aside)
            folder.rename(aside)
            _info(f"hyperadalora: the refused checkpoint {folder} was moved to {aside}", None)


def _training_checkpoint_due(config: RunConfig, done: int) -> bool:
    every = config.save_every or config.eval_every
    return bool(every) and done % every == 0 and done < config.steps


def train(config: RunConfig, *, base_model=None, tokenizer=None, resume: str | Path | None = None) -> RunResult:
    """Trains and evaluates one run; returns its :class:`RunResult`.

    Args:
        config: The run. When resuming, the run's ``config.yaml`` (:func:`load_run`) with at
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
            training rows, a completed run, or no training checkpoint.
        CorruptCheckpointError: When resuming, no checkpoint of the run verifies (a newer
            corrupt one next to a good one is only skipped, with a warning on stderr).
        FileExistsError: The run directory exists and is not empty (new runs).
        NonFiniteLossError: The loss became NaN / inf; the run directory is complete and holds
            the last good adapter.
        KeyboardInterrupt: Ctrl-C; the log, plots, ``eval.json`` (status ``interrupted``), the
            adapter and a training checkpoint of the last completed step are written first.
    """
    started = time.perf_counter()
    resume_dir = resume_from = saved_config = None
    if resume is not None:  # checked before anything is loaded: a bad run directory fails fast
        resume_dir = Path(resume)
        saved_config, resume_from = _prepare_resume(resume_dir)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    spec = task_spec(config.task)
    if not spec.trainable:
        make_task(config, HUB).train_rows()  # raises the evaluation-only message
    # Data first (fast, and the most common mistake), then the model; the run directory last.
    data = resolve_data(config.data_dir, config.task)
    if data != HUB:
        config = config.replace(data_dir=str(data))
    task = make_task(config, data)
    train_rows = task.train_rows()
    eval_rows = task.eval_rows()
    model, tokenizer, config = build_model(config, base_model, tokenizer)
    task.bind(tokenizer)
    if resume_dir is None:
        run_dir = make_run_dir(config)
        config = config.replace(run_name=run_dir.name)  # the resolved config names its directory
        text = config.to_yaml()
        atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    else:
        run_dir = resume_dir
        config = config.replace(output_dir=str(run_dir.parent), run_name=run_dir.name)
        check_resume_config(config, saved_config, run_dir)
    fingerprint = data_fingerprint(train_rows)

    groups = (model.optimizer_param_groups(config.lr, config.weight_decay)
              if hasattr(model, "optimizer_param_groups")
              else [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr,
                     "weight_decay": config.weight_decay}])
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = make_scheduler(optimizer, config.steps, config.effective_warmup_steps, config.min_lr_ratio)
    hyper_lr = next((g["initial_lr"] for g in optimizer.param_groups
                     if g.get("name") == "hypernetworks" and g["initial_lr"] != config.lr), None)

    with contextlib.redirect_stdout(io.StringIO()) as buf:
        model.print_trainable_parameters()
    is_adalora = model.allocator is not None
    modules = list(model.adapted_layers)
    rank_history: list[tuple[int, list[int]]] = []
    if is_adalora:
        rank_history.append((0, [model.ranks[m] for m in modules]))

    log_rows: list[dict] = []
    evals: list[dict] = []
    last_predictions: list[dict] = []
    checkpoint: dict[str, Any] | None = None
    status = "completed"
    stop_message = None
    order = batch_order(len(train_rows), config.batch_size, config.seed)
    eval_every = config.eval_every
    loss_ema, ema_n = 0.0, 0
    start = 0
    if resume_from is not None:
        state = load_training_checkpoint(resume_from, model, optimizer, scheduler, verify=False)
        if state["data"]["fingerprint"] != fingerprint:
            raise ValueError(f"the training rows differ from those {run_dir} was trained on ({len(train_rows)} rows "
                             f"now, {state['data']['train_rows']} then, or other contents): resume with the same "
                             "data (data_dir, train_rows), or start a new run")
        start = state["step"]
        loss_ema, ema_n = state["loss_ema"], state["ema_n"]
        rank_history = [(s, list(r)) for s, r in state["rank_history"]]
        evals, checkpoint = list(state["evals"]), state["checkpoint"]
        log_rows = truncate_log(run_dir / "log.jsonl", start)
        _set_aside_after(run_dir, start)
        for _ in range(state["data"]["batches_consumed"]):  # the same data order from here on
            next(order)
    last_saved = start if resume_from is not None else None

    from tqdm.auto import tqdm

    progress = tqdm(total=config.steps, initial=start, desc=run_dir.name[:40], unit="step", dynamic_ncols=True,
                    disable=not config.progress, file=sys.stderr, mininterval=0.5)
    what = f"resuming run {run_dir} after step {start} ({resume_from})" if resume_from is not None else f"run {run_dir}"
    _info(f"hyperadalora: {what} | task {config.task} | model {config.model} | {len(train_rows)} train rows, "
          f"{len(eval_rows)} {spec.eval_split} rows | {buf.getvalue().strip()}", progress)

    def do_eval(step: int) -> dict:
        nonlocal last_predictions
        metrics, last_predictions = evaluate_rows(task, model, eval_rows)
        row = {"step": step, **metrics}
        evals.append(row)
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        _info(f"eval @ step {step}: {shown}", progress)
        return row

    def checkpoint_now(step: int, reason: str) -> None:
        nonlocal checkpoint
        save_checkpoint(model, run_dir)
        checkpoint = {"step": step, "reason": reason}

    def save_training(done: int, reason: str, rng=None) -> None:
        nonlocal last_saved
        with open(run_dir / "log.jsonl", "rb") as fh:  # the log lines up to the checkpoint are on disk too
            os.fsync(fh.fileno())
        save_training_checkpoint(run_dir, done, model, optimizer, scheduler, {
            "reason": reason, "loss_ema": loss_ema, "ema_n": ema_n,
            "rank_history": [[s, r] for s, r in rank_history], "evals": evals, "checkpoint": checkpoint,
            "data": {"fingerprint": fingerprint, "train_rows": len(train_rows),
                     "batches_consumed": done * config.grad_accum},
        }, keep=config.keep_checkpoints, rng=rng)
        last_saved = done

    def write_outputs(final: dict | None) -> None:  # log.jsonl is written line by line
        if last_predictions:
            _write_jsonl(run_dir / "predictions.jsonl", last_predictions)
        _write_json(run_dir / "eval.json", {
            "task": config.task, "split": spec.eval_split, "num_examples": len(eval_rows),
            "primary_metric": spec.primary_metric, "status": status, "message": stop_message,
            "steps_done": len(log_rows), "final": final, "history": evals, "checkpoint": checkpoint,
            "train_rows": len(train_rows), "seconds": round(time.perf_counter() - started, 2),
            "mean_step_time": (sum(r["step_time"] for r in log_rows) / len(log_rows)) if log_rows else None,
        })
        make_plots(run_dir, config, log_rows, evals, modules, rank_history, model)

    model.train()
    # Between optimizer.step() and the step's log line the state is half updated: a Ctrl-C there
    # writes no training checkpoint. rng_after holds the generators as they were after the last
    # complete step (what a checkpoint written on Ctrl-C must record).
    mid_update, rng_after = False, None

    def start_update() -> None:
        nonlocal mid_update
        mid_update = True

    log_file = open(run_dir / "log.jsonl", "a" if resume_from is not None else "w")
    try:
        for step in range(start, config.steps):
            micro_batches = (task.collate([train_rows[i] for i in next(order)]) for _ in range(config.grad_accum))
            stats = optimizer_step(model, optimizer, micro_batches, step_index=step,
                                   max_grad_norm=config.max_grad_norm, scheduler=scheduler,
                                   grad_accum=config.grad_accum, on_update=start_update)
            if not stats.finite:
                status = "stopped: non-finite loss"
                stop_message = stats.problem
                break
            lr_now = config.lr * stats.lr_factor
            factor = stats.lr_factor
            step_time = stats.seconds
            total_rank = sum(model.ranks.values())
            if is_adalora:
                ranks = [model.ranks[m] for m in modules]
                if ranks != rank_history[-1][1]:
                    rank_history.append((step + 1, ranks))
            row = {"step": step + 1, "epoch": round((step + 1) * config.batch_size * config.grad_accum
                                                    / len(train_rows), 4),
                   "loss": stats.loss, "task_loss": stats.task_loss,
                   "regularizer": stats.regularizer if is_adalora else None,
                   "lr": lr_now, "grad_norm": stats.grad_norm, "step_time": round(step_time, 4),
                   "total_rank": total_rank, "budget": model.budget}
            if hyper_lr is not None:
                row["hyper_lr"] = hyper_lr * factor
            log_rows.append(row)
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            ema_n += 1
            loss_ema = 0.9 * loss_ema + 0.1 * row["loss"]
            rng_after = rng_snapshot(model)
            mid_update = False
            progress.set_postfix(loss=f"{loss_ema / (1 - 0.9 ** ema_n):.4f}", lr=f"{lr_now:.2e}",
                                 rank=total_rank, refresh=False)
            progress.update(1)
            done = step + 1
            if eval_every and done % eval_every == 0 and done < config.steps:
                do_eval(done)
                checkpoint_now(done, "eval")
                write_outputs(None)
            if _training_checkpoint_due(config, done):
                save_training(done, "save_every" if config.save_every else "eval")
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        log_file.close()
        progress.close()

    done = len(log_rows)
    final = None
    if status == "completed":
        if last_saved != done:  # before the final evaluation: a run killed during it resumes right there
            save_training(done, "final")
        final = do_eval(done)
        checkpoint_now(done, "final")
    elif status == "interrupted":  # Ctrl-C: keep what the run made, then stop as asked
        if done > 0 and _all_finite(model):
            checkpoint_now(done, "interrupted")
        if not mid_update and rng_after is not None and last_saved != done:
            save_training(done, "interrupted", rng=rng_after)
        stop_message = (f"interrupted after {done} of {config.steps} steps; "
                        + (f"the adapter of step {done} is in {run_dir / 'adapter'}" if checkpoint and
                           checkpoint["reason"] == "interrupted" else "no adapter was saved")
                        + (f"; continue with `hyperadalora train --resume {run_dir}` (from step {last_saved})"
                           if last_saved else ""))
        write_outputs(None)
        _info(f"hyperadalora: {stop_message}", None)
        raise KeyboardInterrupt(stop_message)
    else:
        if done > 0 and _all_finite(model):
            checkpoint_now(done, "last good step before the non-finite loss")
        where = (f"the last good adapter (step {checkpoint['step']}) is in {run_dir / 'adapter'}" if checkpoint
                 else "no adapter was saved (no step completed)")
        stop_message = (f"training stopped: {stop_message}; {where}. Lower lr (now {config.lr:g}), raise "
                        f"warmup_steps, or keep max_grad_norm > 0 (now {config.max_grad_norm:g}).")
    write_outputs(final)
    result = RunResult(run_dir=run_dir, config=config, status=status, steps_done=done, final_metrics=final,
                       evals=evals, log=log_rows, checkpoint_step=checkpoint["step"] if checkpoint else None,
                       seconds=time.perf_counter() - started, resumed_from_step=start if resume_from else None)
    if status != "completed":
        raise NonFiniteLossError(stop_message, result)
    return result


def make_plots(run_dir: Path, config: RunConfig, log_rows: list[dict], evals: list[dict], modules: list[str],
               rank_history: list[tuple[int, list[int]]], model: AdaptedModel) -> None:
    """Writes ``loss.png`` and, for AdaLoRA, ``ranks.png`` / ``ranks.json``."""
    from .plots import plot_loss, plot_rank_heatmap

    spec = task_spec(config.task)
    title = (f"{config.task} | {config.model} | {config.adapter.method}"
             f"{' (hyper)' if config.adapter.source == 'hyper' else ''} | lr {config.lr:g} | seed {config.seed}")
    if log_rows:
        plot_loss(log_rows, evals, run_dir / "loss.png", title, spec.primary_metric)
    if model.allocator is not None and rank_history:
        _write_json(run_dir / "ranks.json", {"modules": modules, "initial_rank": config.adapter.r,
                                             "history": [{"step": s, "ranks": r} for s, r in rank_history]})
        plot_rank_heatmap(modules, rank_history, max(1, len(log_rows)), config.adapter.r,
                          run_dir / "ranks.png", title)


def load_run(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The resolved config of a run directory (``config.yaml``), with overrides applied."""
    from .config import load_run_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a hyperadalora run directory")
    return load_run_config(path, overrides)


def load_trained(config: RunConfig, adapter_dir: str | Path):
    """``(model, tokenizer)``: the run's base model with the saved adapter loaded."""
    from ..checkpoint import load_adapter

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter (adapter_config.json); a run saves it in "
                                "RUN_DIR/adapter at every evaluation")
    saved_class = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_class") or ""
    spec = task_spec(config.task)
    trained_for = "sequence-classification" if saved_class.endswith("ForSequenceClassification") else (
        "causal-lm" if saved_class.endswith(("ForCausalLM", "LMHeadModel")) else None)
    if trained_for is not None and trained_for != spec.model_task:
        raise ValueError(f"the adapter in {adapter_dir} was trained on a {trained_for} model ({saved_class}), but "
                         f"task {config.task!r} needs a {spec.model_task} model; evaluate it on a task of its kind")
    seed_everything(config.seed)
    base, tokenizer = load_base_model(config)
    return load_adapter(base, adapter_dir), tokenizer


def evaluate_run(config: RunConfig, model=None, tokenizer=None, adapter_dir: str | Path | None = None,
                 out: str | Path | None = None) -> dict:
    """Evaluates a trained adapter (or the bare base model) on ``config.task``'s held-out rows.

    Args:
        config: The run's config (``task``, ``eval_rows``, ... may be overridden).
        model: An already loaded model (with ``tokenizer``); else the base model is loaded and,
            when ``adapter_dir`` is given, the adapter onto it.
        adapter_dir: A saved adapter.
        out: Where to write the results JSON (and predictions next to it as ``.jsonl``).

    Returns:
        ``{"task", "split", "num_examples", "primary_metric", "metrics", "adapter"}``.
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    spec = task_spec(config.task)
    data = resolve_data(config.data_dir, config.task)
    task = make_task(config, data)
    rows = task.eval_rows()
    if model is None:
        if adapter_dir is not None:
            model, tokenizer = load_trained(config, adapter_dir)
        else:
            seed_everything(config.seed)
            model, tokenizer = load_base_model(config)
    task.bind(tokenizer)
    metrics, predictions = evaluate_rows(task, model, rows)
    result = {"task": config.task, "split": spec.eval_split, "num_examples": len(rows),
              "primary_metric": spec.primary_metric, "metrics": metrics, "model": config.model,
              "adapter": str(adapter_dir) if adapter_dir is not None else None}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_json(out, result)
        _write_jsonl(out.with_suffix(".predictions.jsonl"), predictions)
    return result
