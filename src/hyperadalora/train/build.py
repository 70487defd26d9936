"""Building a run's pieces: seeds, the data order, the adapted model, the optimizer and schedule."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapted_model import AdaptedModel, wrap
from ..inject import prepare_adapter_config
from ..quant import precision_dtype, upcast_trainable_
from ..tasks import head_size, make_task, task_spec
from .config import RunConfig
from .schedule import make_scheduler


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
    return load_model(config.model, task=spec.model_task, num_labels=head_size(config),
                      dtype=precision_dtype(config.precision), quantize=config.quantize,
                      device="cpu" if config.device == "cpu" else None)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """transformers' non-reentrant activation checkpointing on ``model`` (a ``PreTrainedModel``).

    ``activation_checkpointing_enable`` where transformers has it (5.x; ``gradient_checkpointing_enable``
    is its deprecated alias there, warned about), else the older name.

    Raises:
        ValueError: ``model`` has neither (not a transformers model).
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ValueError(f"{type(model).__name__} has no activation_checkpointing_enable(); "
                         "gradient_checkpointing=true needs a transformers model")
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_for_scale(model: AdaptedModel, config: RunConfig) -> AdaptedModel:
    """Float32 trainable parameters; the run's activation checkpointing, chunked loss and ``torch.compile``
    (all off by default).

    Checkpointing is transformers' non-reentrant one (the recomputation sees the same generated
    factors and sampled rank as the forward: they are fixed before the base model runs).
    Compiling compiles the base model in place (``nn.Module.compile``), so parameter names,
    saving and export are unchanged.
    """
    upcast_trainable_(model)  # float32 master weights over a bf16 / fp16 base
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model.model)
    if config.loss_chunk_tokens:
        model.enable_chunked_loss(config.loss_chunk_tokens)
    if config.compile:
        model.model.compile()
    return model


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


Calibration = Callable[[RunConfig, Any], Iterable[dict]]
"""``(config, tokenizer) -> batches``: what a policy that decides ranks before the wrap calibrates on."""


@dataclass
class BuiltModel:
    """What :func:`build` made: the wrapped model, its tokenizer, the resolved config and, when the
    allocation policy decided ranks before the wrap, its record (``allocation.to_dict()``)."""

    model: AdaptedModel
    tokenizer: Any
    config: RunConfig
    allocation: Any = None


def build(config: RunConfig, base_model=None, tokenizer=None, calibration: Calibration | None = None) -> BuiltModel:
    """The run's base model wrapped with its adapter, seeded as every run is.

    Seeds every generator with ``config.seed``, loads the base model (unless given), adds the
    classification head to ``modules_to_save`` (:func:`finalize_adapter_config`), lets an
    allocation policy that decides ranks before the wrap calibrate on the base model
    (``calibration``; forward passes only, no random numbers drawn), re-seeds torch and wraps: the
    adapter's initial factors depend only on the config.
    """
    seed_everything(config.seed)
    if base_model is None:
        base_model, tokenizer = load_base_model(config)
    config = finalize_adapter_config(config, base_model)
    batches = calibration(config, tokenizer) if calibration is not None else None
    adapter, record = prepare_adapter_config(base_model, config.adapter, batches)
    if record is not None:
        config = config.replace(adapter=adapter)
    torch.manual_seed(config.seed)
    return BuiltModel(prepare_for_scale(wrap(base_model, config.adapter), config), tokenizer, config, record)


def build_model(config: RunConfig, base_model=None, tokenizer=None, calibration: Calibration | None = None
                ) -> tuple[AdaptedModel, Any, RunConfig]:
    """:func:`build` as ``(model, tokenizer, config)``, ``config`` with the finalized adapter."""
    built = build(config, base_model, tokenizer, calibration)
    return built.model, built.tokenizer, built.config


def calibration_rows(config: RunConfig, train_rows: Sequence, data: Path | str) -> Sequence:
    """The rows ``adapter.allocator.calibration`` names: the run's training rows (``train``), or the
    training rows of a data directory in ``data_dir``'s layout, or those of a data file (read as ``data_source``).

    Args:
        config: The run.
        train_rows: The run's training rows.
        data: The run's resolved data directory (or the hub), for a data file's task.
    """
    source = config.adapter.allocator.calibration
    if source == "train":
        return train_rows
    path = Path(source).expanduser()
    if path.is_dir():
        return make_task(config.replace(data_dir=str(path), train_rows=None), path).train_rows()
    if path.is_file():
        # eval_data_source set: every row of the file is a training row, none held out.
        other = config.replace(data_source=str(path), eval_data_source=str(path), train_rows=None)
        return make_task(other, data).train_rows()
    raise FileNotFoundError(f"adapter.allocator.calibration={source!r} is not a data directory or a data file: "
                            "use 'train', a directory laid out as data_dir, or a file laid out as data_source")


def calibration_batches(config: RunConfig, tokenizer: Any, train_rows: Sequence, data: Path | str
                        ) -> Iterator[dict]:
    """The task's micro-batches (tokenised exactly as training batches) of a seeded sample of
    ``calibration_rows`` rows, ``calibration_batch_size`` at a time, ``calibration_max_length`` tokens each."""
    alloc = config.adapter.allocator
    rows = calibration_rows(config, train_rows, data)
    if not rows:
        raise ValueError(f"adapter.allocator.calibration={alloc.calibration!r} gave no rows")
    task = make_task(config.replace(max_length=alloc.calibration_max_length or config.max_length), data)
    task.bind(tokenizer)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.seed))[:alloc.calibration_rows]
    picked = [rows[i] for i in order.tolist()]
    for start in range(0, len(picked), alloc.calibration_batch_size):
        yield task.collate(picked[start:start + alloc.calibration_batch_size])


def make_optimizer(model: torch.nn.Module, config: RunConfig) -> tuple[torch.optim.Optimizer, Any, float | None]:
    """AdamW over the model's parameter groups and its warm-up + cosine schedule.

    Returns:
        ``(optimizer, scheduler, hyper_lr)``: ``hyper_lr`` is the hypernetworks' own peak
        learning rate when it differs from ``config.lr`` (else None).
    """
    groups = (model.optimizer_param_groups(config.lr, config.weight_decay)
              if hasattr(model, "optimizer_param_groups")
              else [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr,
                     "weight_decay": config.weight_decay}])
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = make_scheduler(optimizer, config.steps, config.effective_warmup_steps, config.min_lr_ratio)
    hyper_lr = next((g["initial_lr"] for g in optimizer.param_groups
                     if g.get("name") == "hypernetworks" and g["initial_lr"] != config.lr), None)
    return optimizer, scheduler, hyper_lr


__all__ = ["BuiltModel", "Calibration", "batch_order", "build", "build_model", "calibration_batches",
           "calibration_rows", "enable_activation_checkpointing", "finalize_adapter_config", "load_base_model",
           "make_optimizer", "prepare_for_scale", "seed_everything"]
