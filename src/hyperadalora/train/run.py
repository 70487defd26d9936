"""One training run as an object: prepare, step, evaluate, checkpoint, finish (see :mod:`.loop`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .. import sharding
from ..adapter_io import whole_adapter_tensors
from ..tasks import HUB, make_task, on_model_device, resolve_data, task_spec
from .build import batch_order, build, calibration_batches, make_optimizer
from .config import RunConfig
from .evaluate import evaluate_rows, held_out_loss
from ..export import export_peft_lora
from ..export_merged import export_merged
from ..transfer import resolve_adapter_dir
from .resume import (check_checkpoint_config, check_resume_config, data_fingerprint, load_training_checkpoint,
                     prepare_resume, prune_checkpoints, save_training_checkpoint, set_aside_after, truncate_log,
                     whole_optimizer_state)
from .rng import rng_snapshot
from .plots import plot_rank_allocation, rank_allocation_image
from .reporting import NullReporter, Reporter, numeric, open_reporter, require_reporter
from .rundir import (OutputWriteError, RunDirLock, check_writable, info, make_run_dir, save_adapter_dir, write_json,
                     write_jsonl, write_plots, write_run_config)
from .parallel import SingleProcess, start_parallel
from .state import RunState
from ..quant import autocast
from .step import StepStats, optimizer_step


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
    main_process: bool = True

    @property
    def primary_metric(self) -> str:
        return task_spec(self.config.task).primary_metric


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the run stopped.

    Attributes:
        result: The :class:`RunResult` of the stopped run (its directory is complete).
    """

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result


def _all_finite(model: torch.nn.Module) -> bool:
    """Whether this rank's trainable parameters (its shards, when sharded) are finite."""
    return all(bool(torch.isfinite(p.to_local() if sharding.is_sharded(p) else p).all())
               for p in model.parameters() if p.requires_grad)


def _progress_every(steps: int) -> int:
    """Steps between the plain progress lines written when stderr is not a terminal (about 20 a run)."""
    return max(1, steps // 20)


def _training_checkpoint_due(config: RunConfig, done: int) -> bool:
    every = config.save_every or config.eval_every
    return bool(every) and done % every == 0 and done < config.steps


class Run:
    """A run of a :class:`RunConfig` in its run directory; :meth:`run` carries it out.

    Args:
        config: The run (see :func:`~hyperadalora.train.train`).
        base_model: Optionally an already loaded base model (modified in place).
        tokenizer: Its tokenizer.
        resume: A run directory to continue in, or None for a new run.
    """

    def __init__(self, config: RunConfig, *, base_model=None, tokenizer=None,
                 resume: str | Path | None = None) -> None:
        self.started = time.perf_counter()
        self.config = config
        self._base_model, self._tokenizer = base_model, tokenizer
        self.resume_dir = Path(resume) if resume is not None else None
        self.resume_from: Path | None = None
        self.state = RunState()
        self.status = "completed"
        self.stop_message: str | None = None
        self.start = 0
        self.last_saved: int | None = None
        # Between optimizer.step() and the step's log line the state is half updated: a Ctrl-C there
        # writes no training checkpoint. rng_after holds the generators as they were after the last
        # complete step (what a checkpoint written on Ctrl-C must record).
        self.mid_update = False
        self.rng_after: dict[str, Any] | None = None
        self.progress = None
        self.lock: RunDirLock | None = None
        self.reporter: Reporter = NullReporter()
        self.done = 0  # optimizer steps completed (the checkpoint's step plus those of this process)
        self.parallel = SingleProcess(config)  # replaced in prepare() under a launcher (see .parallel)

    def run(self) -> RunResult:
        """Prepares, trains every remaining step and finishes (see :func:`~hyperadalora.train.train`)."""
        try:
            self.prepare()
            with self.disk_errors():
                self.train_steps()
                return self.finish()
        finally:
            self.close()

    def close(self) -> None:
        """Closes the reporter and releases the run directory's lock (the end of the run)."""
        try:
            self.reporter.close()
        finally:
            self.reporter = NullReporter()
            if self.lock is not None:
                self.lock.release()
                self.lock = None
            self.parallel.close()

    @contextlib.contextmanager
    def disk_errors(self):
        """Turns an ``OSError`` / ``SafetensorError`` while writing into :class:`OutputWriteError`, saying what
        the run directory still holds."""
        try:
            yield
        except OutputWriteError:
            raise
        except (OSError, SafetensorError) as exc:
            adapter = self.state.checkpoint
            kept = ("log.jsonl up to the last step written, "
                    + (f"the adapter of step {adapter['step']} in adapter/, " if adapter else "no adapter, ")
                    + (f"training checkpoint step-{self.last_saved} (free space, then `hyperadalora train --resume "
                       f"{self.run_dir}`)" if self.last_saved else "no training checkpoint"))
            raise OutputWriteError(f"writing into run directory {self.run_dir} failed after step {self.done}: "
                                   f"{exc}; it keeps {kept}") from exc

    # -- preparation ------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Data, model, run directory, optimizer; a resumed run's checkpoint is restored."""
        saved = None
        if self.resume_dir is not None:  # checked before anything is loaded: a bad run directory fails fast
            saved, self.resume_from = prepare_resume(self.resume_dir)
        self.parallel = start_parallel(self.config)  # the launch is checked before anything is loaded
        self.config = self.config.replace(distributed=self.parallel.kind)
        main = self.parallel.is_main
        self.parallel.on_main(lambda: check_writable(self.resume_dir if self.resume_dir is not None
                                                     else self.config.output_dir))
        if self.config.adapter.init_from is not None:  # before the data and model are loaded
            resolve_adapter_dir(self.config.adapter.init_from)
        require_reporter(self.config.report_to)  # a missing tracker package fails before anything loads
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        self._load_data()  # data first (fast, and the most common mistake), then the model
        if self.resume_dir is not None and main:  # held until the run ends: one launch per run directory
            self.lock = RunDirLock(self.resume_dir).acquire()
        built = build(self.config, self._base_model, self._tokenizer, calibration=self._calibration)
        self.model, tokenizer, self.config = built.model, built.tokenizer, built.config
        self.tokenizer = tokenizer
        self.task.bind(tokenizer)
        self._open_run_dir(saved)
        if built.allocation is not None and main:
            self._record_allocation(built.allocation)
        self.fingerprint = data_fingerprint(self.train_rows)
        with contextlib.redirect_stdout(io.StringIO()) as buf:
            self.model.print_trainable_parameters()
        self.forward = self.parallel.wrap(self.model)  # DDP wrapper, or the model sharded in place
        self.optimizer, self.scheduler, self.hyper_lr = make_optimizer(self.model, self.config)
        self.ranks_change = self.model.allocator.adaptive
        self.modules = list(self.model.adapted_layers)
        if self.ranks_change:
            self.state.record_ranks(0, self._ranks())
        self.order = batch_order(len(self.train_rows), self.config.batch_size, self.config.seed)
        if self.resume_from is not None:
            self._restore()
        if main:
            self.reporter = open_reporter(self.config.report_to, self.run_dir, self.run_dir.name,
                                          self.config.to_dict(),
                                          resume_step=self.start if self.resume_from is not None else None)
        self._open_progress(buf.getvalue().strip())

    def _load_data(self) -> None:
        self.spec = task_spec(self.config.task)
        if not self.spec.trainable:
            make_task(self.config, HUB).train_rows()  # raises the evaluation-only message
        data = resolve_data(self.config.data_dir, self.config.task, self.config.data_source)
        if data != HUB:
            self.config = self.config.replace(data_dir=str(data))
        self.task = make_task(self.config, data)
        self.train_rows = self.task.train_rows()
        self.eval_rows = self.task.eval_rows()  # read before the model loads: its errors come first
        self.config = self.task.settle(self.config)  # e.g. classify's labels, recorded in config.yaml

    def _calibration(self, config: RunConfig, tokenizer: Any):
        """Calibration batches for a policy that decides ranks before the wrap (the task's batches)."""
        return calibration_batches(config, tokenizer, self.train_rows, self.task.data)

    def _record_allocation(self, record: Any) -> None:
        """``allocation.json`` (calibration rows, tokens, seconds; the rank of every module) and
        ``allocation.png`` (ranks by layer and module type)."""
        alloc = self.config.adapter.allocator
        data = {"policy": alloc.policy, "calibration": alloc.calibration, **record.to_dict(),
                "settings": alloc.to_dict()}
        write_json(self.run_dir / "allocation.json", data)
        ranks = data["ranks"]
        plot_rank_allocation(ranks, self.run_dir / "allocation.png",
                             f"{alloc.policy}: {self.config.task} | {self.config.model} | {self.config.adapter.method}")
        info(f"hyperadalora: {alloc.policy} ranks from {data['rows']} calibration rows ({data['tokens']} tokens) in "
             f"{data['seconds']:.2f} s: total {sum(ranks.values())} over {len(ranks)} modules, "
             f"{min(ranks.values())}..{max(ranks.values())}, {data['parameters']:,} factor parameters "
             f"({data['budget']} budget) ({self.run_dir / 'allocation.json'})")

    def _open_run_dir(self, saved: RunConfig | None) -> None:
        if self.resume_dir is None:
            self.run_dir = Path(self.parallel.on_main(self._make_run_dir))  # rank 0 makes it, every rank knows it
            self.config = self.config.replace(run_name=self.run_dir.name)  # the resolved config names its directory
            if self.parallel.is_main:
                write_run_config(self.run_dir, self.config)
        else:
            self.run_dir = self.resume_dir
            self.config = self.config.replace(output_dir=str(self.run_dir.parent), run_name=self.run_dir.name)
            check_resume_config(self.config, saved, self.run_dir)
            check_checkpoint_config(self.config, self.resume_from)

    def _make_run_dir(self) -> str:
        run_dir, self.lock = make_run_dir(self.config)
        return str(run_dir)

    def _restore(self) -> None:
        state = load_training_checkpoint(self.resume_from, self.model, self.optimizer, self.scheduler, verify=False,
                                         rank=self.parallel.rank)
        if state["data"]["fingerprint"] != self.fingerprint:
            raise ValueError(f"the training rows differ from those {self.run_dir} was trained on "
                             f"({len(self.train_rows)} rows now, {state['data']['train_rows']} then, or other "
                             "contents): resume with the same data (data_dir, train_rows), or start a new run")
        self.start = self.last_saved = self.done = state["step"]
        main = self.parallel.is_main  # rank 0 alone rewrites the run directory
        self.state = RunState.from_checkpoint(state, truncate_log(self.run_dir / "log.jsonl", self.start)
                                              if main else [])
        if main:
            set_aside_after(self.run_dir, self.start)
            prune_checkpoints(self.run_dir, self.config.keep_checkpoints, self.resume_from)
        for _ in range(state["data"]["batches_consumed"]):  # the same data order from here on
            next(self.order)

    def _open_progress(self, trainable: str) -> None:
        from tqdm.auto import tqdm

        config = self.config
        # A bar only on a terminal: into a log file its carriage-return frames are noise (see _report_progress).
        self.progress = tqdm(total=config.steps, initial=self.start, desc=self.run_dir.name[:40], unit="step",
                             dynamic_ncols=True, file=sys.stderr, mininterval=0.5,
                             disable=not (config.progress and sys.stderr.isatty() and self.parallel.is_main))
        if not self.parallel.is_main:
            return
        what = (f"resuming run {self.run_dir} after step {self.start} ({self.resume_from})"
                if self.resume_from is not None else f"run {self.run_dir}")
        world = self.parallel.world_size
        if world > 1:
            what += f" on {world} processes ({self.parallel.kind})"
        info(f"hyperadalora: {what} | task {config.task} | model {config.model} | {len(self.train_rows)} train rows, "
             f"{len(self.eval_rows)} {self.spec.eval_split} rows | {trainable}", self.progress)

    # -- training -----------------------------------------------------------------------------------

    def train_steps(self) -> None:
        """The remaining optimizer steps; stops at a non-finite loss or on Ctrl-C (recorded in ``status``)."""
        self.model.train()
        log_file = (open(self.run_dir / "log.jsonl", "a" if self.resume_from is not None else "w")
                    if self.parallel.is_main else None)
        try:
            for step in range(self.start, self.config.steps):
                if not self.step(step, log_file):
                    break
                self._evaluate_or_save_if_due(step + 1)
        except KeyboardInterrupt:
            self.status = "interrupted"
        finally:
            if log_file is not None:
                log_file.close()
            self.progress.close()

    def step(self, step: int, log_file) -> bool:
        """Optimizer step ``step`` (0-based) and its log line; False when it stopped the run (non-finite)."""
        config, parallel = self.config, self.parallel
        micro_batches = (on_model_device(self.model, self.task.collate([self.train_rows[i]
                                                                         for i in parallel.rows(next(self.order))]))
                         for _ in range(config.grad_accum))
        stats = optimizer_step(self.model, self.optimizer, micro_batches, step_index=step,
                               max_grad_norm=config.max_grad_norm, scheduler=self.scheduler,
                               grad_accum=config.grad_accum, on_update=self._start_update,
                               precision=config.precision, forward=self.forward,
                               mean=parallel.mean if parallel.world_size > 1 else None,
                               clip_grad_norm=parallel.clip_grad_norm, sync=parallel.accumulation)
        if not stats.finite:
            self.status, self.stop_message = "stopped: non-finite loss", stats.problem
            return False
        row = self._log_row(step + 1, stats)
        if config.eval_loss_every and ((step + 1) % config.eval_loss_every == 0 or step + 1 == config.steps):
            loss = self.held_out_loss()
            if loss is not None:
                row["eval_loss"] = loss
                info(f"held-out loss @ step {step + 1}: {loss:.4f}", self.progress)
        first_divergence = self.state.diverged_at is None
        smoothed = self.state.record_step(row)
        if log_file is not None:
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
        self._report_row(row)
        self.done = step + 1
        self.rng_after = rng_snapshot(self.model)
        self.mid_update = False
        if row["diverging"] and first_divergence and parallel.is_main:
            info(f"hyperadalora: warning: the loss is diverging at step {step + 1}: smoothed {smoothed:.4g}, over "
                 f"{smoothed / max(abs(self.state.early_loss), 1e-12):.1f}x its early value "
                 f"{self.state.early_loss:.4g}; lower lr (now {config.lr:g}; see docs/troubleshooting.md for the "
                 "ranges that train stably)", self.progress)
        self._report_progress(row, smoothed)
        return True

    def _report_row(self, row: dict[str, Any]) -> None:
        """Sends a step's log row to the reporter: its training values as ``train/``, a held-out loss as ``eval/loss``."""
        self.reporter.log_scalars(row["step"], numeric(row, "train/", skip=("step", "eval_loss")))
        if "eval_loss" in row:
            self.reporter.log_scalars(row["step"], {"eval/loss": row["eval_loss"]})

    def _report_progress(self, row: dict[str, Any], smoothed: float) -> None:
        """Updates the bar on a terminal; elsewhere (a log file, a pipe) prints a plain line now and then."""
        if not self.parallel.is_main:
            return
        self.progress.set_postfix(loss=f"{smoothed:.4f}", lr=f"{row['lr']:.2e}", rank=row["total_rank"],
                                  refresh=False)
        self.progress.update(1)
        steps = self.config.steps
        if self.progress.disable and self.config.progress and (row["step"] % _progress_every(steps) == 0
                                                                or row["step"] == steps):
            info(f"step {row['step']}/{steps} | loss {smoothed:.4f} | lr {row['lr']:.2e} | rank {row['total_rank']}")

    def _start_update(self) -> None:
        self.mid_update = True

    def _ranks(self) -> list[int]:
        ranks = self.model.ranks
        return [ranks[m] for m in self.modules]

    def _log_row(self, done: int, stats: StepStats) -> dict[str, Any]:
        config = self.config
        total_rank = sum(self.model.ranks.values())
        if self.ranks_change:
            self.state.record_ranks(done, self._ranks())
        row = {"step": done, "epoch": round(done * config.batch_size * config.grad_accum / len(self.train_rows), 4),
               "loss": stats.loss, "task_loss": stats.task_loss,
               "regularizer": stats.regularizer if self.model.method.has_regularizer else None,
               "lr": config.lr * stats.lr_factor, "grad_norm": stats.grad_norm, "step_time": round(stats.seconds, 4),
               "total_rank": total_rank, "budget": self.model.budget}
        if self.hyper_lr is not None:
            row["hyper_lr"] = self.hyper_lr * stats.lr_factor
        return row

    def _evaluate_or_save_if_due(self, done: int) -> None:
        config = self.config
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            self.evaluate(done)
            self.save_adapter(done, "eval")
            self.write_outputs(None)
        if _training_checkpoint_due(config, done):
            self.save_training(done, "save_every" if config.save_every else "eval")

    # -- evaluation and saving ----------------------------------------------------------------------

    def evaluate(self, step: int) -> dict[str, Any] | None:
        """Evaluates on the held-out rows; records and prints the metrics; returns ``{"step", **metrics}``
        (None on the ranks that do not record: every rank but 0)."""
        parallel = self.parallel
        if not (parallel.is_main or parallel.evaluates_on_every_rank):
            return None
        with parallel.evaluation(self.model), autocast(self.config.precision, next(self.model.parameters()).device):
            metrics, predictions = evaluate_rows(self.task, self.model, self.eval_rows)
        if not parallel.is_main:
            return None
        self.state.last_predictions = predictions
        row = {"step": step, **metrics}
        self.state.evals.append(row)
        self._report_eval(step, metrics)
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        info(f"eval @ step {step}: {shown}", self.progress)
        return row

    def held_out_loss(self) -> float | None:
        """The evaluation rows' task loss now (``eval_loss_every``); None on the ranks that do not record."""
        parallel = self.parallel
        if not (parallel.is_main or parallel.evaluates_on_every_rank):
            return None
        with parallel.evaluation(self.model), autocast(self.config.precision, next(self.model.parameters()).device):
            loss = held_out_loss(self.task, self.model, self.eval_rows, self.config.eval_batch_size)
        return round(loss, 6) if parallel.is_main else None

    def _report_eval(self, step: int, metrics: dict[str, Any]) -> None:
        """Sends an evaluation's metrics and the rank of every module (an image) to the reporter."""
        self.reporter.log_scalars(step, numeric(metrics, "eval/"))
        if self.reporter.records:  # rendering costs a moment: only for a reporter that keeps it
            config = self.config
            title = f"step {step}: {config.task} | {config.model} | {config.adapter.method}"
            self.reporter.log_image(step, "ranks/per_module", rank_allocation_image(self.model.ranks, title))
        self.reporter.flush()

    def save_adapter(self, step: int, reason: str) -> None:
        """Saves the adapter to ``RUN_DIR/adapter`` and records which step it is (rank 0 writes)."""
        tensors = whole_adapter_tensors(self.model)  # a sharded model's gathered: a collective
        if self.parallel.is_main:
            save_adapter_dir(self.model, self.run_dir, tensors)
        self.state.checkpoint = {"step": step, "reason": reason}

    def export_final(self) -> None:
        """``RunConfig.export``: the peft adapter or the merged model of the completed run, beside ``adapter/``."""
        if self.config.export == "peft":
            export_peft_lora(self.model, self.run_dir / "peft_adapter")
        elif self.config.export == "merged":
            export_merged(self.model, self.run_dir / "merged", tokenizer=self.tokenizer)

    def save_training(self, done: int, reason: str, rng: dict[str, Any] | None = None) -> None:
        """Writes the training checkpoint of step ``done`` (``rng``: the generators' snapshot to record).

        With several processes: whole tensors (gathered) and every rank's generators, written by rank 0.
        """
        parallel = self.parallel
        adapter = whole_adapter_tensors(self.model)  # collectives when sharded
        optimizer_state = whole_optimizer_state(self.optimizer)
        rngs = parallel.gather(rng if rng is not None else rng_snapshot(self.model))
        if parallel.is_main:
            self._write_training_checkpoint(done, reason, adapter, optimizer_state, rngs)
        self.reporter.flush()  # every step up to a checkpoint is on disk: a resume from it loses none
        self.last_saved = done

    def _write_training_checkpoint(self, done: int, reason: str, adapter: dict, optimizer_state: dict,
                                   rngs: list) -> None:
        with open(self.run_dir / "log.jsonl", "rb") as fh:  # the log lines up to the checkpoint are on disk too
            os.fsync(fh.fileno())
        data = {"fingerprint": self.fingerprint, "train_rows": len(self.train_rows),
                "batches_consumed": done * self.config.grad_accum}
        save_training_checkpoint(self.run_dir, done, self.model, self.optimizer, self.scheduler,
                                 {**self.state.trainer_state(reason, data), "config": self.config.to_dict()},
                                 keep=self.config.keep_checkpoints, rng=rngs[0], adapter_tensors=adapter,
                                 optimizer_state=optimizer_state, rank_rngs=rngs[1:])

    def write_outputs(self, final: dict | None) -> None:
        """Writes ``predictions.jsonl``, ``eval.json`` and the plots (``log.jsonl`` is written line by line);
        rank 0 only."""
        if not self.parallel.is_main:
            return
        state, spec = self.state, self.spec
        if state.last_predictions:
            write_jsonl(self.run_dir / "predictions.jsonl", state.last_predictions)
        write_json(self.run_dir / "eval.json", {
            "task": self.config.task, "split": spec.eval_split, "num_examples": len(self.eval_rows),
            "primary_metric": spec.primary_metric, "status": self.status, "message": self.stop_message,
            "steps_done": self.done, "final": final, "history": state.evals, "checkpoint": state.checkpoint,
            "train_rows": len(self.train_rows), "seconds": round(time.perf_counter() - self.started, 2),
            "mean_step_time": state.mean_step_time, "distributed": self.parallel.kind,
            "processes": self.parallel.world_size,
        })
        write_plots(self.run_dir, self.config, state.log_rows, state.evals, self.modules, state.rank_history)

    # -- the end ------------------------------------------------------------------------------------

    def finish(self) -> RunResult:
        """Final evaluation and saving as the run ended; raises as :func:`~hyperadalora.train.train` says."""
        done = self.done
        final = None
        if self.status == "completed":
            if self.last_saved != done:  # before the final evaluation: a run killed during it resumes right there
                self.save_training(done, "final")
            final = self.evaluate(done)
            self.save_adapter(done, "final")
            if self.parallel.is_main:
                self.export_final()
        elif self.status == "interrupted":
            self._finish_interrupted(done)
        else:
            self._finish_stopped(done)
        self.write_outputs(final)
        self.parallel.barrier()  # rank 0's evaluation and writes are done before any rank leaves
        checkpoint = self.state.checkpoint
        result = RunResult(run_dir=self.run_dir, config=self.config, status=self.status, steps_done=done,
                           final_metrics=final, evals=self.state.evals, log=self.state.log_rows,
                           checkpoint_step=checkpoint["step"] if checkpoint else None,
                           seconds=time.perf_counter() - self.started,
                           resumed_from_step=self.start if self.resume_from else None,
                           main_process=self.parallel.is_main)
        if self.status != "completed":
            raise NonFiniteLossError(self.stop_message, result)
        return result

    def _finish_interrupted(self, done: int) -> None:
        """Ctrl-C: keeps what the run made, then stops as asked (raises KeyboardInterrupt).

        With several processes nothing more is saved: the ranks stop at different points, and a
        gather could wait for a rank that is gone; the last training checkpoint stands."""
        if self.parallel.world_size > 1:
            self.stop_message = (f"interrupted after {done} of {self.config.steps} steps on {self.parallel.world_size} "
                                 "processes; " + (f"continue from step {self.last_saved} with the same launch and "
                                                  f"`--resume {self.run_dir}`" if self.last_saved
                                                  else "no training checkpoint was written yet"))
            self.write_outputs(None)
            if self.parallel.is_main:
                info(f"hyperadalora: {self.stop_message}")
            raise KeyboardInterrupt(self.stop_message)
        if done > 0 and _all_finite(self.model):
            self.save_adapter(done, "interrupted")
        if not self.mid_update and self.rng_after is not None and self.last_saved != done:
            self.save_training(done, "interrupted", rng=self.rng_after)
        checkpoint = self.state.checkpoint
        self.stop_message = (f"interrupted after {done} of {self.config.steps} steps; "
                             + (f"the adapter of step {done} is in {self.run_dir / 'adapter'}"
                                if checkpoint and checkpoint["reason"] == "interrupted" else "no adapter was saved")
                             + (f"; continue with `hyperadalora train --resume {self.run_dir}` (from step "
                                f"{self.last_saved})" if self.last_saved else ""))
        self.write_outputs(None)
        info(f"hyperadalora: {self.stop_message}")
        raise KeyboardInterrupt(self.stop_message)

    def _finish_stopped(self, done: int) -> None:
        """A non-finite loss: keeps the last good adapter (if finite) and says what to change."""
        if done > 0 and self.parallel.all_ranks(_all_finite(self.model)):
            self.save_adapter(done, "last good step before the non-finite loss")
        checkpoint, config = self.state.checkpoint, self.config
        where = (f"the last good adapter (step {checkpoint['step']}) is in {self.run_dir / 'adapter'}" if checkpoint
                 else "no adapter was saved (no step completed)")
        self.stop_message = (f"training stopped: {self.stop_message}; {where}. Lower lr (now {config.lr:g}), raise "
                             f"warmup_steps, or keep max_grad_norm > 0 (now {config.max_grad_norm:g}).")


__all__ = ["NonFiniteLossError", "Run", "RunResult"]
