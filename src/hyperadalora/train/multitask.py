"""One set of hypernetworks trained on several tasks at once, with a task embedding
(``hyperadalora multitask``; HyperFormer-style amortisation, issue 20 item 2).

The run is the single-task run's config with ``adapter.source=hyper`` and
``adapter.hyper.task_embeddings`` set to the number of tasks. Optimizer step ``k`` trains task
``k mod T`` (round robin, every micro-batch of the step from that task, since the generated
factors are shared by a batch): ``model.set_task(k mod T)`` selects its embedding, its rows come
from that task's own seeded order. The model's head (``modules_to_save``) is shared, so the tasks
must have the same model kind and number of labels (SST-2, MRPC, CoLA, RTE, WNLI are all binary).

What a new task starts from: ``hyperadalora train PRESET adapter.source=hyper
adapter.hyper.task_embeddings=1 adapter.init_from=MULTITASK_RUN`` (its embedding starts at the
mean of the source tasks'; :mod:`hyperadalora.transfer`).

Run directory: ``config.yaml`` (the resolved config; ``task`` is the first task), ``tasks.json``
(the task order: embedding ``i`` is task ``i``), ``log.jsonl`` (one line per step, with ``task``),
``eval.json`` (each task's held-out metrics at the end) and ``adapter/``. No training checkpoints:
a stopped multi-task run starts again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..tasks import HUB, head_size, make_task, resolve_data, task_spec
from .build import batch_order, build, make_optimizer
from .config import TASK_NAMES, RunConfig
from .evaluate import evaluate_rows
from .rundir import check_writable, info, make_run_dir, save_adapter_dir, write_json, write_run_config
from .step import optimizer_step


@dataclass
class MultiTaskResult:
    """What a multi-task run produced: its directory, task order, per-task final metrics and log."""

    run_dir: Path
    tasks: tuple[str, ...]
    metrics: dict[str, dict[str, Any]]
    log: list[dict[str, Any]]
    seconds: float


def check_tasks(config: RunConfig, tasks: Sequence[str]) -> tuple[str, ...]:
    """The tasks as a tuple, after checking that one hypernetwork set and one head can serve them.

    Raises:
        ValueError: Fewer than two distinct tasks, an unknown or evaluation-only task, a task of
            another model kind or number of labels than the first, or ``adapter.source`` not ``hyper``.
    """
    tasks = tuple(tasks)
    if len(tasks) < 2 or len(set(tasks)) != len(tasks):
        raise ValueError(f"multitask needs at least two distinct tasks, got {list(tasks)}: e.g. --tasks cola,mrpc")
    unknown = [t for t in tasks if t not in TASK_NAMES or not task_spec(t).trainable]
    if unknown:
        raise ValueError(f"multitask: {unknown} are not trainable tasks; use some of "
                         f"{', '.join(t for t in TASK_NAMES if task_spec(t).trainable)}")
    first = config.replace(task=tasks[0])
    kind, labels = task_spec(tasks[0]).model_task, head_size(first)
    for task in tasks[1:]:
        other = config.replace(task=task)
        if (task_spec(task).model_task, head_size(other)) != (kind, labels):
            raise ValueError(f"multitask: {task} needs a {task_spec(task).model_task} head of size {head_size(other)}, "
                             f"{tasks[0]} a {kind} head of size {labels}; the tasks share one head, so train tasks "
                             "of one kind and number of labels together")
    if config.data_source is not None:
        raise ValueError("multitask reads each task's own data (data_dir); drop data_source")
    allocator = config.adapter.allocator  # None: a fixed-rank method without one
    if allocator is not None and allocator.decides_before_wrap:
        raise ValueError(f"multitask: allocator.policy={allocator.policy!r} calibrates on one task's "
                         "rows before the wrap; use an adaptive policy (adalora, sigma-grad) or fixed ranks")
    if config.adapter.source != "hyper":
        raise ValueError(f"multitask trains hypernetworks with a task embedding: set adapter.source=hyper (got "
                         f"{config.adapter.source!r})")
    return tasks


def multitask_config(config: RunConfig, tasks: Sequence[str]) -> RunConfig:
    """``config`` for a multi-task run: the first task, one task embedding per task."""
    tasks = check_tasks(config, tasks)
    adapter = config.adapter.to_dict()
    adapter["hyper"] = {**adapter["hyper"], "task_embeddings": len(tasks)}
    return config.replace(task=tasks[0], adapter=adapter)


class _TaskData:
    """One task's rows, collator and seeded batch order."""

    def __init__(self, config: RunConfig, index: int) -> None:
        data = resolve_data(config.data_dir, config.task, config.data_source)
        self.name = config.task
        self.task = make_task(config.replace(data_dir=str(data)) if data != HUB else config, data)
        self.train_rows = self.task.train_rows()
        self.eval_rows = self.task.eval_rows()
        self.order = batch_order(len(self.train_rows), config.batch_size, config.seed + index)

    def micro_batches(self, count: int):
        return (self.task.collate([self.train_rows[i] for i in next(self.order)]) for _ in range(count))


def train_multitask(config: RunConfig, tasks: Sequence[str]) -> MultiTaskResult:
    """Trains one adapter with task-embedded hypernetworks on ``tasks`` (see the module docstring).

    Args:
        config: The run (its ``task`` is replaced by the first of ``tasks``).
        tasks: Two or more tasks of one model kind and number of labels.

    Returns:
        The :class:`MultiTaskResult`.

    Raises:
        ValueError / FileNotFoundError: Bad tasks, config or data (before anything is written).
        NonFiniteLossError is not raised: a non-finite step stops the run with ``status`` in eval.json.
    """
    started = time.perf_counter()
    config = multitask_config(config, tasks)  # checks the tasks
    tasks = tuple(tasks)
    check_writable(config.output_dir)
    data = [_TaskData(config.replace(task=task), i) for i, task in enumerate(tasks)]  # before the model
    built = build(config, None, None)
    model, config = built.model, built.config
    for d in data:
        d.task.bind(built.tokenizer)
    if config.run_name is None:
        config = config.replace(run_name=f"multitask-{'+'.join(tasks)}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir, lock = make_run_dir(config)
    try:
        write_run_config(run_dir, config)
        write_json(run_dir / "tasks.json", {"tasks": list(tasks), "embedding_of": {t: i for i, t in enumerate(tasks)}})
        log, status = _train_steps(model, config, data, run_dir)
        metrics = _evaluate_each(model, data)
        save_adapter_dir(model, run_dir)
        seconds = time.perf_counter() - started
        write_json(run_dir / "eval.json", {"tasks": metrics, "status": status, "steps_done": len(log),
                                           "seconds": round(seconds, 2)})
    finally:
        lock.release()
    return MultiTaskResult(run_dir, tasks, metrics, log, seconds)


def _train_steps(model, config: RunConfig, data: list[_TaskData], run_dir: Path) -> tuple[list[dict], str]:
    """The round-robin optimizer steps; one log line each. Returns the log and the status."""
    optimizer, scheduler, _ = make_optimizer(model, config)
    model.train()
    log: list[dict] = []
    every = max(1, config.steps // 20)
    with open(run_dir / "log.jsonl", "w") as fh:
        for step in range(config.steps):
            index = step % len(data)
            model.set_task(index)
            stats = optimizer_step(model, optimizer, data[index].micro_batches(config.grad_accum), step_index=step,
                                   max_grad_norm=config.max_grad_norm, scheduler=scheduler,
                                   grad_accum=config.grad_accum, precision=config.precision)
            if not stats.finite:
                info(f"hyperadalora multitask: stopped: {stats.problem}")
                return log, "stopped: non-finite loss"
            row = {"step": step + 1, "task": data[index].name, "loss": stats.loss, "task_loss": stats.task_loss,
                   "lr": stats.lr, "grad_norm": stats.grad_norm, "total_rank": sum(model.ranks.values())}
            log.append(row)
            fh.write(json.dumps(row) + "\n")
            if config.progress and ((step + 1) % every == 0 or step + 1 == config.steps):
                info(f"step {step + 1}/{config.steps} | {row['task']} loss {stats.loss:.4f} | rank {row['total_rank']}")
    return log, "completed"


def _evaluate_each(model, data: list[_TaskData]) -> dict[str, dict[str, Any]]:
    """Each task's held-out metrics with its own embedding."""
    out = {}
    for index, d in enumerate(data):
        model.set_task(index)
        metrics, _ = evaluate_rows(d.task, model, d.eval_rows)
        out[d.name] = metrics
        info(f"eval {d.name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in metrics.items()))
    return out


__all__ = ["MultiTaskResult", "check_tasks", "multitask_config", "train_multitask"]
