"""Training checkpoints and resuming a run (``hyperadalora train --resume RUN_DIR``).

A training checkpoint is a folder ``RUN_DIR/checkpoints/step-<N>/`` holding everything the loop
needs to continue after optimizer step ``N`` exactly as an uninterrupted run would::

    adapter_config.json, adapter_model.safetensors, allocator_state.*
                         the adapter as ``save_adapter`` writes it (hypernetwork states included);
                         ``load_adapter(base, step_dir)`` loads it like any adapter folder
    optimizer.safetensors / optimizer.json
                         AdamW's state_dict flattened: tensors / param groups and other values
    rng.safetensors      torch CPU (and CUDA) generator states, Python's and NumPy's Mersenne
                         Twister keys, the DyLoRA rank sampler's state
    rng-rank<k>.safetensors
                         the same for rank k >= 1 of a run on several processes (their dropout
                         draws differ from rank 0's)
    trainer_state.json   step, scheduler state, loss EMA, rank history, evaluations, the data
                         position and a fingerprint of the training rows, scalar RNG state
    manifest.json        size and SHA-256 of every file above, written last

Nothing is pickled. The folder is written as ``.step-<N>.tmp`` and renamed when complete, so a
run killed while saving leaves the previous checkpoints as they were; the last
``keep_checkpoints`` complete ones are kept and older ones deleted only after the new one is in
place. On resume the newest checkpoint whose files match their manifest is used; a newer corrupt
one is skipped with a warning on stderr that names the refused file.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .. import sharding
from ..adapter_io import save_adapter
from ..checkpoint import load_adapter_weights
from ..fileio import (CorruptCheckpointError, atomic_write, replace_dir, verify_checkpoint, write_json, write_manifest,
                      write_tensors)
from .config import RunConfig
from .rng import capture_rng, restore_rng
from .rundir import info, load_run

CHECKPOINTS_DIR = "checkpoints"
OPTIMIZER_NAME = "optimizer.safetensors"
OPTIMIZER_META_NAME = "optimizer.json"
RNG_NAME = "rng.safetensors"
RANK_RNG_NAME = "rng-rank{rank}.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"
STATE_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d+)")

#: RunConfig fields a resumed run may change: none of them alters the training math or what the
#: run records in its own files (``output_dir`` / ``run_name`` follow the resumed directory;
#: ``report_to`` only picks which tracker also receives the records; ``distributed``: the batch is global,
#: so a run continues alike on another number of processes; ``loss_chunk_tokens``: the same loss and
#: gradients in less memory, for a run resumed on a smaller machine; ``device``: a run may move between
#: machines, as between numbers of processes).
RESUME_SAFE_FIELDS = frozenset({"progress", "threads", "data_dir", "output_dir", "run_name", "save_every",
                                "keep_checkpoints", "eval_batch_size", "sandbox_timeout_s", "sandbox_memory_mb",
                                "sandbox_workers", "report_to", "distributed", "loss_chunk_tokens",
                                "device"})


# -- optimizer state (no pickle) ---------------------------------------------------------------

def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Splits ``optimizer.state_dict()`` into tensors (``state/<param>/<name>``) and JSON values."""
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{index}/{name}"] = value
            else:
                values.setdefault(str(index), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "state_values": values,
                     "tuple_keys": sorted({k for g in state_dict["param_groups"] for k, v in g.items()
                                           if isinstance(v, tuple)})}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    """The inverse of :func:`flatten_optimizer_state`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in meta["state_values"].items():
        state.setdefault(int(index), {}).update(entries)
    tuple_keys = set(meta.get("tuple_keys", ()))
    groups = [{k: (tuple(v) if k in tuple_keys and isinstance(v, list) else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# -- writing and finding checkpoints -------------------------------------------------------------

def checkpoint_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``[(step, folder)]`` of ``RUN_DIR/checkpoints/step-<N>`` folders, oldest first (complete or not)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return sorted(found)


def save_training_checkpoint(run_dir: str | Path, step: int, model, optimizer: torch.optim.Optimizer,
                             scheduler, trainer_state: dict[str, Any], *, keep: int = 2,
                             rng: dict[str, Any] | None = None, adapter_tensors: dict[str, torch.Tensor] | None = None,
                             optimizer_state: dict | None = None, rank_rngs: list[dict[str, Any]] = ()) -> Path:
    """Writes ``RUN_DIR/checkpoints/step-<step>/`` (see the module docstring) and prunes old ones.

    Args:
        run_dir: The run directory.
        step: Optimizer steps completed.
        model: The :class:`~hyperadalora.AdaptedModel`.
        optimizer: Its optimizer.
        scheduler: Its learning-rate scheduler.
        trainer_state: The loop's JSON state (loss EMA, evaluations, data position, ...).
        keep: How many complete checkpoints to keep (the newest ones; at least this one).
        rng: A :func:`~.rng.rng_snapshot` of the generators (default: taken now).
        adapter_tensors: The whole adapter tensors to write (a sharded model's, gathered); default
            the model's own.
        optimizer_state: The whole ``optimizer.state_dict()`` (a sharded one, gathered); default the
            optimizer's own.
        rank_rngs: Snapshots of ranks 1, 2, ... of a run on several processes.

    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_adapter(model, tmp, tensors=adapter_tensors)
    opt_tensors, opt_meta = flatten_optimizer_state(optimizer_state or optimizer.state_dict())
    write_tensors(tmp / OPTIMIZER_NAME, opt_tensors)
    write_json(tmp / OPTIMIZER_META_NAME, opt_meta, sort_keys=False)
    rng_tensors, rng_meta = capture_rng(model, rng)
    write_tensors(tmp / RNG_NAME, rng_tensors)
    rank_metas = []
    for rank, snapshot in enumerate(rank_rngs, start=1):
        tensors, meta = capture_rng(model, snapshot)
        write_tensors(tmp / RANK_RNG_NAME.format(rank=rank), tensors)
        rank_metas.append(meta)
    if rank_metas:
        trainer_state = {**trainer_state, "rank_rngs": rank_metas}
    state = {"format_version": STATE_VERSION, "step": step, **trainer_state, "rng": rng_meta,
             "scheduler": scheduler.state_dict(), "after_step_calls": model.steps_taken,
             "dylora_rank": model.dylora_rank}
    write_json(tmp / TRAINER_STATE_NAME, state, sort_keys=False, default=str)
    write_manifest(tmp, step=step)  # last: a folder without a valid manifest is incomplete
    replace_dir(tmp, target)
    prune_checkpoints(run_dir, keep, target)
    return target


def prune_checkpoints(run_dir: str | Path, keep: int, newest: Path | None = None) -> None:
    """Deletes all but the newest ``keep`` complete checkpoints (never ``newest``); also run on resume,
    since a run killed right after a checkpoint's rename never pruned."""
    complete = [p for _, p in checkpoint_dirs(run_dir) if (p / "manifest.json").is_file()]
    for old in complete[:-max(1, keep)]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def find_resume_checkpoint(run_dir: str | Path) -> Path:
    """The newest checkpoint of a run whose files match their manifest.

    A newer checkpoint that fails verification is skipped with a warning on stderr naming the
    refused file.

    Raises:
        FileNotFoundError: The run has no training checkpoint.
        CorruptCheckpointError: None of its checkpoints verifies (the message lists each refusal).
    """
    found = checkpoint_dirs(run_dir)
    if not found:
        raise FileNotFoundError(f"{Path(run_dir) / CHECKPOINTS_DIR} holds no training checkpoint (step-<N> folder) "
                                "to resume from: a run writes one every save_every steps (save_every=0: at every "
                                "evaluation, eval_every), on Ctrl-C and at the end; start a new run instead")
    refused: list[CorruptCheckpointError] = []
    for _, folder in reversed(found):
        try:
            verify_checkpoint(folder)
        except CorruptCheckpointError as exc:
            refused.append(exc)
            print(f"hyperadalora: warning: skipping checkpoint {folder.name}: {exc}", file=sys.stderr, flush=True)
            continue
        return folder
    first = refused[0]
    raise CorruptCheckpointError(f"no usable checkpoint in {Path(run_dir) / CHECKPOINTS_DIR}: every one failed "
                                 "verification (" + "; ".join(str(e) for e in refused) + "); start a new run",
                                 first.path, first.checkpoint)


def whole_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded (FSDP2) state tensor gathered whole (a
    collective per tensor, in the same order on every rank; the tensors themselves otherwise)."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: sharding.full(v) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
                      for i, entry in state["state"].items()}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, folder: str | Path) -> None:
    """Loads ``optimizer.safetensors`` / ``optimizer.json`` (whole tensors) into ``optimizer``; the
    state of a sharded (FSDP2) parameter becomes this rank's shard (no communication)."""
    folder = Path(folder)
    saved = unflatten_optimizer_state(load_file(str(folder / OPTIMIZER_NAME)),
                                      json.loads((folder / OPTIMIZER_META_NAME).read_text()))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved["state"] = {i: {k: sharding.like(v, params[i]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                          for k, v in entry.items()} for i, entry in saved["state"].items()}
    optimizer.load_state_dict(saved)


def load_training_checkpoint(folder: str | Path, model, optimizer: torch.optim.Optimizer, scheduler,
                             verify: bool = True, rank: int = 0) -> dict[str, Any]:
    """Restores a checkpoint into a freshly built model, optimizer and scheduler, and the RNGs.

    A model sharded since it was built (FSDP2) gets its shards of the whole tensors stored.

    Args:
        folder: A ``step-<N>`` folder.
        model: The run's :class:`~hyperadalora.AdaptedModel`, built as the run built it.
        optimizer: Its optimizer (same parameter groups).
        scheduler: Its scheduler.
        verify: Check the manifest first (skip only when the caller just did).
        rank: This process's rank: it takes its own generators when the checkpoint has them
            (written by a run on as many processes or more), else rank 0's.

    Returns:
        The trainer state (``trainer_state.json``) for the loop's own counters.

    Raises:
        CorruptCheckpointError: A file does not match the manifest.
    """
    folder = Path(folder)
    if verify:
        verify_checkpoint(folder)
    state = json.loads((folder / TRAINER_STATE_NAME).read_text())
    if state.get("format_version") != STATE_VERSION:
        raise ValueError(f"{folder / TRAINER_STATE_NAME}: unsupported format_version {state.get('format_version')!r} "
                         f"(this library reads {STATE_VERSION})")
    load_adapter_weights(model, folder)
    model.restore_steps_taken(state["after_step_calls"])
    if state.get("dylora_rank") is not None:
        for layer in model.adapted_layers.values():
            layer.dylora_b = state["dylora_rank"]
    load_optimizer_state(optimizer, folder)
    scheduler.load_state_dict(state["scheduler"])
    own = folder / RANK_RNG_NAME.format(rank=rank)
    if rank > 0 and own.is_file():
        restore_rng(load_file(str(own)), state["rank_rngs"][rank - 1], model)
    else:
        restore_rng(load_file(str(folder / RNG_NAME)), state["rng"], model)
    return state


# -- the run's side ------------------------------------------------------------------------------

def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def _run_changes(config: RunConfig, reference: RunConfig, where: str) -> str:
    """``"field (old in <where>, new now), ..."`` for every field outside :data:`RESUME_SAFE_FIELDS`
    that differs ("" when none does)."""
    mine, theirs = _flat(config.to_dict()), _flat(reference.to_dict())
    changed = [k for k in sorted(set(mine) | set(theirs))
               if k not in RESUME_SAFE_FIELDS and mine.get(k) != theirs.get(k)]
    return ", ".join(f"{k} ({theirs.get(k)!r} in {where}, {mine.get(k)!r} now)" for k in changed)


def check_resume_config(config: RunConfig, saved: RunConfig, run_dir: str | Path) -> None:
    """Refuses a resume whose config differs from the run's ``config.yaml`` in anything but
    :data:`RESUME_SAFE_FIELDS` (the message names each differing field and both values)."""
    shown = _run_changes(config, saved, "the run")
    if shown:
        raise ValueError(f"--resume continues {run_dir} with its own config.yaml; these changes would alter the run: "
                         f"{shown}. Only {', '.join(sorted(RESUME_SAFE_FIELDS))} may be overridden; start a new run "
                         "for other settings")


def check_checkpoint_config(config: RunConfig, folder: Path) -> None:
    """Refuses a resume whose config differs from the one checkpoint ``folder`` was written with
    (stored in its ``trainer_state.json``) in anything but :data:`RESUME_SAFE_FIELDS`: a hand-edited
    ``config.yaml`` (an lr or seed changed after the fact) is caught here, naming the field."""
    stored = json.loads((folder / TRAINER_STATE_NAME).read_text()).get("config")
    if stored is None:  # checkpoints of older versions carry no config
        return
    shown = _run_changes(config, RunConfig.from_dict(stored), "the checkpoint")
    if shown:
        raise ValueError(f"the config differs from the one checkpoint {folder} was trained with: {shown}. Was "
                         f"{folder.parents[1] / 'config.yaml'} edited by hand? Put those values back, or start a "
                         "new run for other settings")


def prepare_resume(run_dir: Path) -> tuple[RunConfig, Path]:
    """The resumed run's saved config and the newest checkpoint that verifies (nothing loaded yet).

    Raises:
        ValueError: The run already completed.
        FileNotFoundError / CorruptCheckpointError: See :func:`find_resume_checkpoint`.
    """
    saved = load_run(run_dir)
    info_path = run_dir / "eval.json"
    if info_path.is_file():
        try:
            done = json.loads(info_path.read_text())
        except ValueError:
            done = {}
        if isinstance(done, dict) and done.get("status") == "completed" and done.get("final") is not None:
            raise ValueError(f"{run_dir} already completed its {saved.steps} steps (see its eval.json); nothing to "
                             "resume: start a new run (or `hyperadalora eval` it)")
    return saved, find_resume_checkpoint(run_dir)


def set_aside_after(run_dir: Path, step: int) -> None:
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
            info(f"hyperadalora: the refused checkpoint {folder} was moved to {aside}")


def data_fingerprint(rows) -> str:
    """SHA-256 of the training rows' ``repr`` (in order): a resumed run must see the same data."""
    import hashlib

    digest = hashlib.sha256()
    for row in rows:
        digest.update(repr(row).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def truncate_log(path: str | Path, step: int) -> list[dict]:
    """Keeps the lines of ``log.jsonl`` up to optimizer step ``step`` (rewriting the file atomically).

    Lines after the checkpoint (and a half-written last line) are dropped: the resumed run
    writes them again. A damaged log (unreadable lines, missing or repeated steps) is rebuilt
    from its good lines up to the checkpoint, with a warning on stderr that says what was lost;
    the training state itself comes from the checkpoint, so the run continues unchanged.

    Returns:
        The rows kept.
    """
    path = Path(path)
    rows: list[dict] = []
    kept: list[str] = []
    bad = 0
    for line in (path.read_text(errors="replace").splitlines() if path.is_file() else []):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        at = row.get("step") if isinstance(row, dict) else None
        if isinstance(at, int) and not isinstance(at, bool) and at > step:
            continue  # after the checkpoint: written again by the resumed run
        if not isinstance(at, int) or isinstance(at, bool) or at < 1 or (rows and at <= rows[-1]["step"]):
            bad += 1
            continue
        rows.append(row)
        kept.append(line + "\n")
    missing = sorted(set(range(1, step + 1)) - {r["step"] for r in rows})
    if bad or missing:
        info(f"hyperadalora: warning: {path} was damaged ({bad} unreadable or out-of-order line(s) dropped; "
             f"{len(missing)} of the {step} steps up to the checkpoint have no line"
             + (f", first {missing[0]}" if missing else "") + "); it was rebuilt from its good lines up to step "
             f"{step}, and the run continues from the checkpoint")
    text = "".join(kept)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return rows


__all__ = ["CHECKPOINTS_DIR", "RESUME_SAFE_FIELDS", "check_checkpoint_config", "check_resume_config",
           "checkpoint_dirs", "data_fingerprint", "find_resume_checkpoint", "flatten_optimizer_state",
           "load_optimizer_state", "load_training_checkpoint", "prepare_resume", "prune_checkpoints",
           "save_training_checkpoint", "set_aside_after", "truncate_log", "unflatten_optimizer_state",
           "whole_optimizer_state"]
