"""The per-step cost of the ``tuned`` experiment's methods: step time interleaved, peak memory.

Each method's model is the one its run trained: the run's own config (from the run cache) built
by :func:`hyperadalora.train.build.build`, with Sensitivity-LoRA's ranks taken from the run's
calibration record (``rank_pattern``), so no calibration is repeated. The step is the library's
training step (:func:`.step_model.make_step`); the methods take turns step by step
(:func:`.step_model.time_interleaved`), so machine noise hits them alike. Memory: peak resident
growth over a few steps in a fresh subprocess (:func:`.step_model.measure_memory`, which calls
:func:`build` of this module).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable

import torch

from ...tasks import task_spec
from .step_model import make_batch, make_step, measure_memory, time_interleaved

__all__ = ["as_causal_lm", "build", "load_base", "make_batch", "measure_costs"]


def load_base() -> dict[str, torch.nn.Module]:
    """An empty cache of base models by name; :func:`build` loads the model each run names into it."""
    return {}


def build(method: str, bases: dict[str, torch.nn.Module], run: dict) -> tuple[Callable, int, Callable]:
    """:func:`.step_model.make_step` of ``method`` as its run ``run`` trained it.

    Args:
        method: The method name (a label only).
        bases: :func:`load_base`'s cache (its models are copied, never changed).
        run: ``{"config": the run's config dict, "rank_pattern": its calibrated ranks or None}``.
    """
    from ...models import load_model
    from ...train import load_run_config
    from ...train.build import build as build_run

    overrides = {"adapter.rank_pattern": run["rank_pattern"]} if run.get("rank_pattern") else {}
    config = load_run_config(run["config"], overrides)
    model_task = task_spec(config.task).model_task
    if config.model not in bases:
        bases[config.model], _ = load_model(config.model, task=model_task, num_labels=2)
    model = build_run(config, copy.deepcopy(bases[config.model])).model
    step, trainable, state_bytes = make_step(model, method)
    if model_task == "causal-lm":
        return as_causal_lm(step), trainable, state_bytes
    return step, trainable, state_bytes


def as_causal_lm(step: Callable) -> Callable:
    """``step`` on :func:`make_batch`'s batches with the tokens as labels: every token scored, the work
    of an instruction batch of that length (the class labels would not fit a causal LM's loss)."""
    def causal_step(batch: dict, accumulate: int = 1, phases: dict | None = None) -> None:
        step({**batch, "labels": batch["input_ids"]}, accumulate, phases)
    return causal_step


def measure_costs(runs: dict[str, dict], steps: int, seq_len: int, threads: int, memory_steps: int = 3) -> dict:
    """``{method: {"step_s", "step_ratio", "trainable", "peak_mib"}}`` (``step_ratio``: to the first method).

    Args:
        runs: ``{method: run}`` as :func:`build` takes it; the first is the reference.
        steps: Timed steps per method (after 3 untimed ones).
        seq_len: Tokens per row of the random batch (batch size: the runs' own).
        threads: torch threads (here and in the memory subprocesses).
        memory_steps: Steps of each memory subprocess.
    """
    torch.set_num_threads(threads)
    batch_size = next(iter(runs.values()))["config"]["batch_size"]
    bases = load_base()
    built = {m: build(m, bases, r) for m, r in runs.items()}
    times = time_interleaved({m: b[0] for m, b in built.items()}, make_batch(batch_size, seq_len), steps, warmup=3)
    median = {m: statistics.median(t) for m, t in times.items()}
    ref = median[next(iter(runs))]
    mem_args = argparse.Namespace(threads=threads, batch_size=batch_size, accumulate=1, seq_len=seq_len,
                                  memory_steps=memory_steps)
    return {m: {"step_s": median[m], "step_ratio": median[m] / ref, "trainable": built[m][1],
                "peak_mib": measure_memory(m, mem_args, runs[m], module="tuned_cost")} for m in runs}
