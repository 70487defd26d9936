"""The ``hyperadalora`` command line: ``train``, ``multitask``, ``eval``, ``export``, ``presets``, ``bench``,
``plan``.

Examples::

    hyperadalora train sst2_minilm_adalora --data-dir ../shared/data steps=50
    hyperadalora train configs/rte_minilm_hyperadalora.yaml adapter.hyper.arch=mlp lr=3e-3
    hyperadalora multitask sst2_minilm_hyperadalora --tasks cola,mrpc --data-dir ../shared/data   # task embeddings
    hyperadalora eval runs/<run>                       # the run's task, its saved adapter
    hyperadalora eval runs/<run> task=humaneval eval_rows=20
    hyperadalora export runs/<run> --out runs/<run>/peft   # a plain peft LoRA adapter
    hyperadalora export runs/<run> --out peft16 --pad-rank 16   # every module at rank 16 (vLLM max_lora_rank)
    hyperadalora export runs/<run> --merged runs/<run>/merged   # a plain transformers model (adapter folded in)
    hyperadalora presets
    hyperadalora bench convergence --data-dir ../shared/data   # a paper experiment (bench: the list)
    hyperadalora bench commands                        # every registered command (what `make bench` runs)
    hyperadalora plan llama-8b --gpus 4 --precision 4bit --source hyper   # memory and FLOPs (docs/plan.md)

A config is a preset name (``configs/<name>.yaml``), a YAML file, or nothing (defaults);
``key=value`` items override it (dotted for the adapter: ``adapter.r=16``,
``adapter.allocator.target_r=4``, ``adapter.hyper.arch=mlp``). ``hyperadalora train --help``
lists every field. Exit status: 0 on success, 2 for a bad config / model / data (or an output
directory that cannot be written, or a run directory in use by another process), 1 when the
loss became NaN or infinite (the run directory keeps the last good adapter), 130 on Ctrl-C
(the run directory keeps the log, plots and the adapter of the last completed step).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .train.help import fields_help
from .train.presets import configs_dir, list_presets, load_run_config

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 1
EXIT_INTERRUPTED = 130
_RAW = argparse.RawDescriptionHelpFormatter  # keep the hand-wrapped help texts


def _split_items(items: list[str], command: str) -> tuple[str | None, list[str]]:
    positional = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    if len(positional) > 1:
        raise ValueError(f"{command}: expected at most one config (a preset name or YAML file), got "
                         f"{positional}; overrides are key=value")
    return (positional[0] if positional else None), overrides


def _with_flags(overrides: list[str], args: argparse.Namespace) -> list[str]:
    out = list(overrides)
    if getattr(args, "data_dir", None) is not None:
        out.append(f"data_dir={args.data_dir}")
    if getattr(args, "output_dir", None) is not None:
        out.append(f"output_dir={args.output_dir}")
    if getattr(args, "no_progress", False):
        out.append("progress=false")
    return out


def _presets_text() -> str:
    names = list_presets()
    return f"presets in {configs_dir()}: " + (", ".join(names) if names else "none found")


def _add_run_flags(p: argparse.ArgumentParser, progress: str) -> None:
    """``--data-dir``, ``--output-dir`` and ``--no-progress`` of the commands that train (``progress``: what
    ``--no-progress`` turns off)."""
    p.add_argument("--data-dir", help="data directory (sets data_dir; else $HYPERADALORA_DATA_DIR, else the hub)")
    p.add_argument("--output-dir", help="where run directories are created (sets output_dir)")
    p.add_argument("--no-progress", action="store_true", help=f"{progress} (sets progress=false)")


def _add_train_parser(sub) -> None:
    """``train``: a run config, trained and evaluated in one run directory."""
    p = sub.add_parser("train", help="train an adapter and evaluate it (one run directory)", formatter_class=_RAW,
                       description="Trains the adapter of a run config, evaluates it on the task's held-out rows, "
                                   "and writes config.yaml, log.jsonl, eval.json, predictions.jsonl, adapter/, "
                                   "loss.png (and ranks.png for AdaLoRA) into output_dir/run_name.",
                       epilog=fields_help() + "\n\n" + _presets_text())
    p.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="a preset name or YAML file, then overrides")
    _add_run_flags(p, "no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a stopped run in RUN_DIR from its newest intact training checkpoint "
                        "(checkpoints/step-<N>), with RUN_DIR/config.yaml; only key=value overrides that do not "
                        "change the run (progress, threads, data_dir, save_every, keep_checkpoints, ...) are accepted")


def _add_multitask_parser(sub) -> None:
    """``multitask``: one set of hypernetworks on several tasks."""
    p = sub.add_parser("multitask", help="train one set of hypernetworks on several tasks (task embeddings)",
                       formatter_class=_RAW,
                       description="Trains a hyper-source adapter on --tasks at once (round robin by optimizer "
                                   "step, one learned task embedding each, one shared head) and evaluates it on "
                                   "each task; writes config.yaml, tasks.json, log.jsonl, eval.json and adapter/ "
                                   "into output_dir/run_name. Start a new task from it with `hyperadalora train "
                                   "PRESET adapter.source=hyper adapter.hyper.task_embeddings=1 "
                                   "adapter.init_from=RUN_DIR` (its embedding starts at the mean of these).",
                       epilog=_presets_text())
    p.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="a preset name or YAML file (its task is replaced by the first of --tasks), then overrides")
    p.add_argument("--tasks", required=True, help="comma-separated tasks of one kind and number of labels, "
                   "e.g. cola,mrpc")
    _add_run_flags(p, "no progress lines")


def _add_eval_parser(sub) -> None:
    """``eval``: a run's adapter (or a base model) on a task."""
    p = sub.add_parser("eval", help="evaluate a run's adapter (or a base model) on a task", formatter_class=_RAW,
                       description="TARGET is a run directory (its config.yaml and adapter/ are used; writes "
                                   "RUN_DIR/eval-<task>.json) or a preset / YAML file (the base model, or --adapter).",
                       epilog=fields_help() + "\n\n" + _presets_text())
    p.add_argument("items", nargs="*", metavar="TARGET [key=value ...]", help="run directory or config, then overrides")
    p.add_argument("--data-dir", help="data directory (sets data_dir)")
    p.add_argument("--adapter", help="adapter directory (default: RUN_DIR/adapter for a run directory)")
    p.add_argument("--out", help="results JSON path (predictions go next to it)")


def _add_export_parser(sub) -> None:
    """``export``: a peft adapter and / or a merged model."""
    p = sub.add_parser("export", help="export a run's adapter as a plain peft LoRA adapter or a merged model",
                       formatter_class=_RAW,
                       description="Loads the run's base model and adapter and writes a peft LoRA adapter "
                                   "(PeftModel.from_pretrained(base, OUT) loads it) and / or, with --merged, a full "
                                   "transformers model with the adapter folded into its weights "
                                   "(AutoModelFor<Task>.from_pretrained(DIR) loads it, without hyperadalora or "
                                   "peft). Each output is written aside and moved in when complete.")
    p.add_argument("items", nargs="*", metavar="RUN_DIR [key=value ...]", help="run directory, then overrides")
    p.add_argument("--adapter", help="adapter directory (default: RUN_DIR/adapter)")
    p.add_argument("--out", help="peft adapter directory (default: RUN_DIR/peft_lora, unless only --merged is "
                   "given); must not lie inside the run's adapter/ or checkpoints/, and must be empty unless --force")
    p.add_argument("--merged", metavar="DIR", help="also (or, without --out, only) write the merged model "
                   "(config, safetensors weights, tokenizer) to DIR; same rules as --out")
    p.add_argument("--dequantize", action="store_true", help="with --merged on a quantised run (quantize=4bit / "
                   "8bit): dequantise the base to its compute dtype and write a full-precision merged model "
                   "(without it such a run is refused)")
    p.add_argument("--pad-rank", type=int, metavar="N", help="pad every module of the peft adapter to rank N with "
                   "zeros (same outputs; one r for servers with a maximum LoRA rank, e.g. vLLM's max_lora_rank); "
                   "refused, before anything is written, if a module's rank exceeds N")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out / --merged folder "
                   "(replacing its files of the same names)")


def _add_bench_parser(sub) -> None:
    """``bench``: the registered benchmarks."""
    from .bench.registry import list_text

    p = sub.add_parser("bench", help="run the paper-reproduction benchmarks (BENCHMARKS.md)",
                       formatter_class=_RAW, description="Runs the registered experiment NAME; the options after "
                       "NAME are its own (`hyperadalora bench NAME --help` lists them). Results go to "
                       "benchmarks/results/<name>.json / .md / .png. `all [--group quick] [--data-dir D]` runs every "
                       "registered command (`make bench`, `make bench-quick`), `commands` prints them, "
                       "`render [NAME ...] [--check]` rebuilds the result tables from their JSON.",
                       epilog="benchmarks:\n" + list_text())
    p.add_argument("name", nargs="?", metavar="NAME", help="the benchmark, or all / commands / render "
                   "(none: list them)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="...", help="options of the benchmark")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperadalora", description=__doc__, formatter_class=_RAW)
    sub = parser.add_subparsers(dest="command", metavar="{train,multitask,eval,export,presets,bench,plan}")
    sub.required = True
    for add in (_add_train_parser, _add_multitask_parser, _add_eval_parser, _add_export_parser):
        add(sub)
    sub.add_parser("presets", help="list the shipped presets")
    _add_bench_parser(sub)
    from .plan.cli import add_parser as add_plan_parser

    add_plan_parser(sub)
    return parser


def _is_run_dir(item: str | None) -> bool:
    return item is not None and Path(item).is_dir() and (Path(item) / "config.yaml").is_file()


def cmd_train(args: argparse.Namespace) -> int:
    from .train import NonFiniteLossError, train

    source, overrides = _split_items(args.items, "train")
    if args.resume is not None:
        if source is not None or args.output_dir is not None:
            given = f"config {source!r}" if source is not None else "--output-dir"
            raise ValueError(f"--resume continues the run in {args.resume} with its own config.yaml: drop {given} "
                             "(key=value overrides that do not change the run are accepted)")
        if not _is_run_dir(args.resume):
            raise FileNotFoundError(f"--resume {args.resume}: not a run directory (a folder with config.yaml, as "
                                    "`hyperadalora train` writes)")
        from .train import load_run

        config = load_run(args.resume, _with_flags(overrides, args))
    else:
        config = load_run_config(source, _with_flags(overrides, args))
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    try:
        result = train(config, resume=args.resume)
    except NonFiniteLossError as exc:
        if not exc.result.main_process:
            return EXIT_NONFINITE
        print(f"hyperadalora: {exc}", file=sys.stderr)
        print(json.dumps({"run_dir": str(exc.result.run_dir), "status": exc.result.status,
                          "steps_done": exc.result.steps_done, "checkpoint_step": exc.result.checkpoint_step}))
        return EXIT_NONFINITE
    if not result.main_process:  # under torchrun / accelerate launch, rank 0 reports for the run
        return 0
    metric = result.primary_metric
    value = (result.final_metrics or {}).get(metric)
    print(f"hyperadalora: done in {result.seconds:.1f} s: {config.task} {metric} "
          f"{value if value is None else round(value, 4)} on {(result.final_metrics or {}).get('num_examples')} "
          f"held-out rows; run directory {result.run_dir}", file=sys.stderr)
    print(json.dumps({"run_dir": str(result.run_dir), "status": result.status, "steps_done": result.steps_done,
                      "metrics": result.final_metrics}))
    return 0


def cmd_multitask(args: argparse.Namespace) -> int:
    from .train.multitask import train_multitask

    source, overrides = _split_items(args.items, "multitask")
    config = load_run_config(source, _with_flags(overrides, args))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    result = train_multitask(config, tasks)
    print(f"hyperadalora: multitask done in {result.seconds:.1f} s on {', '.join(result.tasks)}; run directory "
          f"{result.run_dir}", file=sys.stderr)
    print(json.dumps({"run_dir": str(result.run_dir), "tasks": list(result.tasks), "metrics": result.metrics}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import evaluate_run, load_run

    target, overrides = _split_items(args.items, "eval")
    overrides = _with_flags(overrides, args)
    if target is not None and Path(target).is_dir() and not _is_run_dir(target):
        raise FileNotFoundError(f"eval: {target} is a folder but not a run directory (it has no config.yaml, as "
                                "`hyperadalora train` writes); give a run directory, a preset or a YAML file")
    if _is_run_dir(target):
        config = load_run(target, overrides)
        adapter = args.adapter or str(Path(target) / "adapter")
        out = args.out or str(Path(target) / f"eval-{config.task}.json")
    else:
        config = load_run_config(target, overrides)
        adapter, out = args.adapter, args.out
    result = evaluate_run(config, adapter_dir=adapter, out=out)
    print(json.dumps(result))
    return 0


def _export_outputs(args: argparse.Namespace, run_dir: Path, quantize: str | None) -> tuple[Path | None, Path | None]:
    """``(peft_out, merged_out)``, checked before the model loads."""
    from .export import check_export_dir

    if args.dequantize and args.merged is None:
        raise ValueError("--dequantize applies to --merged (the peft adapter serves on the quantised base as it is)")
    if args.pad_rank is not None and args.pad_rank < 1:
        raise ValueError(f"--pad-rank must be a positive rank (the server's maximum LoRA rank), got {args.pad_rank}")
    if args.pad_rank is not None and args.merged is not None and args.out is None:
        raise ValueError("--pad-rank pads the peft adapter: give --out too (a merged model has no rank)")
    if args.merged is not None and quantize is not None and not args.dequantize:
        raise ValueError(f"this run's base is quantised (quantize={quantize}): a merged model cannot be written "
                         "into packed weights; pass --dequantize to write a full-precision merged model, or export "
                         "the peft adapter (--out) and serve it on the quantised base")
    adapter = Path(args.adapter or run_dir / "adapter")
    peft_out = Path(args.out) if args.out is not None else (None if args.merged else run_dir / "peft_lora")
    merged_out = Path(args.merged) if args.merged is not None else None
    if peft_out is not None and merged_out is not None and peft_out.absolute() == merged_out.absolute():
        raise ValueError(f"--out and --merged are the same folder {peft_out}: give two folders")
    for out in (peft_out, merged_out):
        if out is not None:
            check_export_dir(out, protected=[adapter, run_dir / "adapter", run_dir / "checkpoints"],
                             force=args.force)
    return peft_out, merged_out


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_peft_lora
    from .export_merged import export_merged
    from .models import resolve_model_path
    from .train import load_run, load_trained

    target, overrides = _split_items(args.items, "export")
    if not _is_run_dir(target):
        raise FileNotFoundError(f"export: {target!r} is not a run directory (a folder with config.yaml, as "
                                "`hyperadalora train` writes)")
    config = load_run(target, overrides)
    peft_out, merged_out = _export_outputs(args, Path(target), config.quantize)  # before the model loads
    model, tokenizer = load_trained(config, Path(args.adapter or Path(target) / "adapter"))
    written = {}
    if peft_out is not None:
        export_peft_lora(model, peft_out, base_model_name_or_path=str(resolve_model_path(config.model)),
                         pad_rank=args.pad_rank)
        written["peft_adapter"] = str(peft_out)
    if merged_out is not None:
        export_merged(model, merged_out, tokenizer=tokenizer, dequantize=args.dequantize)
        written["merged_model"] = str(merged_out)
    print(json.dumps(written))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.registry import bench_main

    rest = list(args.bench_args) + list(getattr(args, "items", []) or [])
    return bench_main(([args.name] if args.name is not None else []) + rest)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hyperadalora`` console script; returns the exit status."""
    parser = build_parser()
    # Overrides may come after options (`train preset --data-dir D steps=5`): argparse leaves
    # such positionals over, so they are collected here.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-")]
    if unknown or (extra and args.command == "presets"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.items = list(args.items) + extra
    if args.command == "presets":
        for name in list_presets():
            print(name)
        return 0
    from .plan.cli import run as cmd_plan

    handler = {"train": cmd_train, "multitask": cmd_multitask, "eval": cmd_eval, "export": cmd_export,
               "bench": cmd_bench, "plan": cmd_plan}[args.command]
    from .quant import QuantizedMergeError
    from .train.rundir import OutputWriteError, RunDirBusyError

    try:
        return handler(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError,
            OutputWriteError, RunDirBusyError, QuantizedMergeError) as exc:
        print(f"hyperadalora {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
