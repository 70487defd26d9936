"""Evaluating a model on a task's held-out rows, and loading a trained adapter to do so."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..adapted_model import AdaptedModel
from ..tasks import Task, make_task, on_model_device, resolve_data, task_spec
from .build import load_base_model, seed_everything
from .config import RunConfig
from .rundir import write_json, write_jsonl


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


@torch.no_grad()
def held_out_loss(task: Task, model: AdaptedModel | torch.nn.Module, rows: Sequence, batch_size: int) -> float:
    """The task loss of ``rows`` in eval mode (no dropout, no regulariser), teacher-forced as in training.

    Each batch's mean loss is weighted by the targets it averages (:meth:`Task.loss_weight`), so
    the result is the mean over every target of ``rows`` whatever ``batch_size`` is. The model's
    mode is restored.

    Args:
        task: The task, bound to its tokenizer (it builds the batches, labels included).
        model: The model (with an adapter or bare).
        rows: Held-out rows that carry their targets (:meth:`Task.eval_rows`).
        batch_size: Rows per forward.

    Returns:
        The mean loss per target.
    """
    if not rows:
        raise ValueError("the held-out loss needs at least one evaluation row (eval_rows >= 1)")
    was_training = model.training
    model.eval()
    total = weight = 0.0
    try:
        for start in range(0, len(rows), batch_size):
            batch = on_model_device(model, task.collate(rows[start:start + batch_size]))
            targets = task.loss_weight(batch)
            if targets:  # a batch whose responses were all truncated away has no loss to add
                total += float(model(**batch).loss) * targets
                weight += targets
    finally:
        model.train(was_training)
    if not weight:
        raise ValueError(f"none of the {len(rows)} evaluation rows keeps a target within max_length: raise "
                         "max_length or evaluate on other rows")
    return total / weight


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
    data = resolve_data(config.data_dir, config.task, config.data_source)
    task = make_task(config, data)
    rows = task.eval_rows()
    config = task.settle(config)
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
        write_json(out, result)
        write_jsonl(out.with_suffix(".predictions.jsonl"), predictions)
    return result


__all__ = ["evaluate_rows", "evaluate_run", "held_out_loss", "load_trained"]
