"""HumanEval pass@1 of benchmark runs' adapters (or of the bare base model), cached per run.

Generating 164 programs with a 135M model takes longer on a CPU than the run that trained the
adapter, so the evaluations are cached (``<cache>.json`` with the metrics, ``<cache>.predictions.jsonl``
with every completion and its outcome) and spread over worker processes like the runs themselves.
Every generated program runs in the sandbox of :mod:`hyperadalora.sandbox`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .runner import in_processes

#: Generation settings of the benchmark's HumanEval: whole functions, greedy, 8 prompts a batch.
HUMANEVAL_OVERRIDES = ["task=humaneval", "max_new_tokens=256", "eval_batch_size=8"]


def humaneval_pass1(run_dir: str | Path | None, cache: str | Path, rows: int, data_dir: str | None,
                    threads: int | None = 1) -> dict:
    """Evaluates one run's adapter on the first HumanEval problems, or reads the cached result.

    Args:
        run_dir: A kept run directory (its ``adapter/`` is loaded onto its base model); ``None``
            evaluates the base model of the ``humaneval_smollm2`` preset without adapter.
        cache: The result file to read or write.
        rows: How many problems, from the first.
        data_dir: The data directory (``None``: ``$HYPERADALORA_DATA_DIR`` / the hub).
        threads: torch threads (``None``: leave torch's setting).

    Returns:
        :func:`hyperadalora.train.evaluate_run`'s result (``metrics["pass@1"]``).
    """
    from ..train import evaluate_run, load_run, load_run_config

    cache = Path(cache)
    if cache.is_file():
        return json.loads(cache.read_text())
    cache.parent.mkdir(parents=True, exist_ok=True)
    overrides = [*HUMANEVAL_OVERRIDES, f"eval_rows={rows}"]
    overrides += [f"threads={threads}"] if threads is not None else []  # evaluate_run sets them
    overrides += [f"data_dir={data_dir}"] if data_dir else []
    if run_dir is None:
        config, adapter_dir, label = load_run_config("humaneval_smollm2", overrides), None, "base model"
    else:
        run_dir = Path(run_dir)
        config, adapter_dir, label = load_run(run_dir, overrides), run_dir / "adapter", run_dir.name
    result = evaluate_run(config, adapter_dir=adapter_dir, out=cache)
    print(f"humaneval {label}: {result['metrics']}", file=sys.stderr, flush=True)
    return result


def humaneval_many(jobs: dict[str, str | Path | None], cache_dir: str | Path, rows: int, data_dir: str | None,
                   workers: int = 1, threads: int | None = 1, only_cached: bool = False) -> dict[str, dict]:
    """pass@1 of several runs, ``workers`` evaluations at a time.

    Args:
        jobs: ``{name: run_dir}``; the result is cached as ``<cache_dir>/<name>.json``
            (``run_dir`` ``None``: the base model).
        cache_dir: Where the results are kept.
        rows, data_dir, threads: As :func:`humaneval_pass1`.
        workers: Evaluations at a time, each in its own process.
        only_cached: Evaluate nothing; return what is cached (to rebuild tables).

    Returns:
        ``{name: result}`` for every job that has a result.
    """
    cache_dir = Path(cache_dir)
    results = {name: json.loads((cache_dir / f"{name}.json").read_text()) for name in jobs
               if (cache_dir / f"{name}.json").is_file()}
    todo = [name for name in jobs if name not in results]
    if only_cached or not todo:
        return results
    print(f"bench: HumanEval ({rows} problems) for {len(todo)} model(s), {workers} at a time", file=sys.stderr,
          flush=True)
    calls = [(jobs[name], cache_dir / f"{name}.json", rows, data_dir, threads) for name in todo]
    for i, result in in_processes(humaneval_pass1, calls, workers):
        results[todo[i]] = result
    return results
