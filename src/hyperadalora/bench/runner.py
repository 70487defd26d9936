"""Benchmark runs: one :class:`RunSpec` = one run of the real training loop, cached on disk.

Each finished run leaves ``<cache_dir>/<key>.json`` (its loss curve, step times, dev metrics and
config), so a benchmark that is stopped and started again runs only what is missing, and the
tables can always be rebuilt from the cached curves. Runs go to worker processes (``workers``
at a time, each with its own torch thread count): on a 2-core machine two 1-thread workers
finish a sweep about twice as fast as one 2-thread process.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import write_json
from .curves import smoothed_final


@dataclass(frozen=True)
class RunSpec:
    """One training run of the benchmark.

    Attributes:
        key: Unique, file-name-safe name of the run (the cache file is ``<key>.json``).
        config: A preset name, YAML path or config dict (as :func:`load_run_config` takes).
        overrides: Dotted ``{key: value}`` overrides applied on top of ``config``.
        tags: Free labels copied into the cached result (task, model, method, lr, seed, ...).
        keep_run_dir: Keep the run directory (adapter, logs) after the run; else it is deleted.
    """

    key: str
    config: Any
    overrides: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    keep_run_dir: bool = False

    def __post_init__(self) -> None:
        if not self.key or any(ch in self.key for ch in "/\\ ") or self.key.startswith("."):
            raise ValueError(f"RunSpec.key {self.key!r} must be a plain file name (no '/', '\\\\' or spaces)")


def run_one(spec: RunSpec, cache_dir: str | Path, data_dir: str | None, threads: int = 1) -> dict:
    """Runs ``spec`` with the real training loop and caches its curve; returns the cached dict."""
    import torch

    from ..train import NonFiniteLossError, load_run_config, train

    torch.set_num_threads(threads)
    cache_dir = Path(cache_dir)
    done = load_cached(spec, cache_dir)
    if done is not None:  # another benchmark sharing this cache ran it meanwhile
        return done
    run_root = cache_dir / "runs"
    run_dir = run_root / spec.key
    if run_dir.exists():  # left by a run that was killed: start it again from scratch
        shutil.rmtree(run_dir)
    overrides = {**spec.overrides, "output_dir": str(run_root), "run_name": spec.key, "progress": False,
                 "threads": threads}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    config = load_run_config(spec.config, overrides)
    started = time.perf_counter()
    try:
        result = train(config)
        status, diverged = result.status, False
    except NonFiniteLossError as err:
        result, status, diverged = err.result, "diverged", True
    log = result.log
    losses = [r["task_loss"] if r.get("task_loss") is not None else r["loss"] for r in log]
    out = {
        "key": spec.key, "tags": spec.tags, "status": status, "diverged": diverged,
        "lr": config.lr, "seed": config.seed, "steps": config.steps,
        "losses": losses, "step_times": [r["step_time"] for r in log],
        "regularizer": [r.get("regularizer") for r in log],
        "total_rank": [r.get("total_rank") for r in log],
        # eval_loss_every: [step, held-out loss] pairs; None without it (the cache's older runs alike)
        "eval_losses": [[r["step"], r["eval_loss"]] for r in log if "eval_loss" in r] or None,
        "final_metrics": result.final_metrics, "final_smoothed": smoothed_final(losses),
        "seconds": round(time.perf_counter() - started, 2), "threads": threads,
        "config": config.to_dict(), "run_dir": str(run_dir) if spec.keep_run_dir else None,
    }
    # A policy that decides ranks before the wrap leaves its calibration record (seconds, ranks) there.
    allocation = run_dir / "allocation.json"
    if allocation.is_file():
        record = json.loads(allocation.read_text())
        out["allocation"] = {k: record.get(k) for k in ("policy", "rows", "tokens", "seconds", "total_rank", "ranks")}
    if not math.isfinite(out["final_smoothed"]):
        out["final_smoothed"] = None
    if not spec.keep_run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    write_json(cache_dir / f"{spec.key}.json", out)
    return out


# Run-config keys that say where and how visibly a run goes, not what it computes.
_NOT_RESULT_KEYS = frozenset({"output_dir", "run_name", "progress", "threads", "data_dir", "save_every",
                              "keep_checkpoints", "sandbox_workers", "report_to", "export", "distributed",
                              "device"})


def config_differences(cached: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys where a cached run's config differs from the config its spec gives now.

    A key the cached config lacks (a field added after the run was made) counts as equal when its
    value now is ``None`` or ``False``: new fields default to off. Keys in ``_NOT_RESULT_KEYS``
    (at the top level) are ignored.

    Args:
        cached: ``config`` of the cached result (JSON).
        current: ``RunConfig.to_dict()`` of the spec now.
        prefix: Dotted prefix of these dicts (for recursion).

    Returns:
        The differing keys, sorted (empty: the cached run is this spec's run).
    """
    out = []
    for key in sorted(set(cached) | set(current)):
        name = f"{prefix}{key}"
        if not prefix and key in _NOT_RESULT_KEYS:
            continue
        if key not in cached:
            if current[key] not in (None, False):
                out.append(name)
        elif key not in current:
            out.append(name)
        elif isinstance(cached[key], dict) and isinstance(current[key], dict):
            out += config_differences(cached[key], current[key], name + ".")
        elif cached[key] != current[key]:
            out.append(name)
    return out


def spec_config(spec: RunSpec) -> dict:
    """The run config ``spec`` resolves to now, as JSON (what :func:`run_one` would train)."""
    from ..train import load_run_config

    return json.loads(json.dumps(load_run_config(spec.config, dict(spec.overrides)).to_dict()))


def load_cached(spec: RunSpec, cache_dir: str | Path) -> dict | None:
    """The cached result of ``spec``.

    ``None`` when it has not run, when its kept run dir is gone, or when it was made with another
    config than the spec resolves to now (a changed default, say): then it is run again.
    """
    path = Path(cache_dir) / f"{spec.key}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if spec.keep_run_dir and not (data.get("run_dir") and Path(data["run_dir"]).is_dir()):
        return None
    stale = config_differences(data.get("config") or {}, spec_config(spec))
    if stale:
        print(f"bench: the cached run {spec.key} was made with another config ({', '.join(stale[:5])}"
              f"{', ...' if len(stale) > 5 else ''} differ); it is stale and runs again", file=sys.stderr, flush=True)
        return None
    return data


def adopt_cached(specs: list[RunSpec], other_dir: str | Path, cache_dir: str | Path) -> list[str]:
    """Copies into ``cache_dir`` the results another benchmark's cache holds for ``specs``.

    Only a result :func:`load_cached` accepts for the spec (same resolved config) is copied, so
    two experiments sharing a protocol share its runs without running them twice.

    Returns:
        The keys copied.
    """
    copied = []
    for spec in specs:
        if load_cached(spec, cache_dir) is not None:
            continue
        found = load_cached(spec, other_dir)
        if found is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            write_json(Path(cache_dir) / f"{spec.key}.json", found)
            copied.append(spec.key)
    return copied


def run_specs(specs: list[RunSpec], cache_dir: str | Path, data_dir: str | None, workers: int = 1,
              threads: int = 1, only_cached: bool = False) -> dict[str, dict]:
    """Runs every spec that has no cached result (``workers`` processes at a time).

    Args:
        specs: The runs, in the order to start them.
        cache_dir: Where results (and run directories) are kept.
        data_dir: The data directory (``None``: ``$HYPERADALORA_DATA_DIR`` / the hub).
        workers: Runs at a time, each in its own process.
        threads: torch threads per run.
        only_cached: Run nothing; return what is cached (to rebuild tables).

    Returns:
        ``{key: result}`` for every spec that has a result.
    """
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"two runs share the key {dup!r}")
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    results = {s.key: r for s in specs if (r := load_cached(s, cache_dir)) is not None}
    todo = [s for s in specs if s.key not in results]
    if only_cached or not todo:
        return results
    print(f"bench: {len(results)} of {len(specs)} runs cached in {cache_dir}; running {len(todo)} "
          f"({workers} at a time, {threads} thread(s) each)", file=sys.stderr, flush=True)

    def report(i: int, res: dict) -> None:
        fs = res["final_smoothed"]
        metric = (res["final_metrics"] or {})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metric.items() if isinstance(v, float) and k != "seconds")
        print(f"bench: [{i}/{len(todo)}] {res['key']}: {res['status']}, final smoothed loss "
              f"{'n/a' if fs is None else f'{fs:.4f}'}, {shown}, {res['seconds']:.0f} s", file=sys.stderr,
              flush=True)

    calls = [(s, str(cache_dir), data_dir, threads) for s in todo]
    for i, (_, res) in enumerate(in_processes(run_one, calls, workers), 1):
        results[res["key"]] = res
        report(i, res)
    return results


def in_processes(fn: Callable, calls: list[tuple], workers: int = 1) -> Iterator[tuple[int, Any]]:
    """Calls ``fn(*call)`` for every call, ``workers`` spawned processes at a time.

    Args:
        fn: A module-level function (it is pickled by name into the workers).
        calls: The argument tuples, in the order to start them.
        workers: Processes at a time; ``<= 1`` runs every call in this process, in order.

    Yields:
        ``(index into calls, result)`` as each call finishes.
    """
    if workers <= 1:
        for i, call in enumerate(calls):
            yield i, fn(*call)
        return
    ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(fn, *call): i for i, call in enumerate(calls)}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()
