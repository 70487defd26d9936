"""The ``hyperadalora`` command line: ``train``, ``eval``, ``export``, ``presets`` and ``bench``.

Examples::

    hyperadalora train sst2_minilm_adalora --data-dir ../shared/data steps=50
    hyperadalora train configs/rte_minilm_hyperadalora.yaml adapter.hyper.arch=mlp lr=3e-3
    hyperadalora eval runs/<run>                       # the run's task, its saved adapter
    hyperadalora eval runs/<run> task=humaneval eval_rows=20
    hyperadalora export runs/<run> --out runs/<run>/peft   # a plain peft LoRA adapter
    hyperadalora presets
    hyperadalora bench convergence --data-dir ../shared/data   # a paper experiment (bench: the list)
    hyperadalora bench commands                        # every registered command (what `make bench` runs)

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperadalora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,export,presets,bench}")
    sub.required = True
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("train", help="train an adapter and evaluate it (one run directory)", formatter_class=raw,
                       description="Trains the adapter of a run config, evaluates it on the task's held-out rows, "
                                   "and writes config.yaml, log.jsonl, eval.json, predictions.jsonl, adapter/, "
                                   "loss.png (and ranks.png for AdaLoRA) into output_dir/run_name.",
                       epilog=fields_help() + "\n\n" + _presets_text())
    p.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="a preset name or YAML file, then overrides")
    p.add_argument("--data-dir", help="data directory (sets data_dir; else $HYPERADALORA_DATA_DIR, else the hub)")
    p.add_argument("--output-dir", help="where run directories are created (sets output_dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (sets progress=false)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a stopped run in RUN_DIR from its newest intact training checkpoint "
                        "(checkpoints/step-<N>), with RUN_DIR/config.yaml; only key=value overrides that do not "
                        "change the run (progress, threads, data_dir, save_every, keep_checkpoints, ...) are accepted")

    p = sub.add_parser("eval", help="evaluate a run's adapter (or a base model) on a task", formatter_class=raw,
                       description="TARGET is a run directory (its config.yaml and adapter/ are used; writes "
                                   "RUN_DIR/eval-<task>.json) or a preset / YAML file (the base model, or --adapter).",
                       epilog=fields_help() + "\n\n" + _presets_text())
    p.add_argument("items", nargs="*", metavar="TARGET [key=value ...]", help="run directory or config, then overrides")
    p.add_argument("--data-dir", help="data directory (sets data_dir)")
    p.add_argument("--adapter", help="adapter directory (default: RUN_DIR/adapter for a run directory)")
    p.add_argument("--out", help="results JSON path (predictions go next to it)")

    p = sub.add_parser("export", help="export a run's adapter as a plain peft LoRA adapter", formatter_class=raw,
                       description="Loads the run's base model and adapter and writes a peft LoRA adapter "
                                   "(PeftModel.from_pretrained(base, OUT) loads it).")
    p.add_argument("items", nargs="*", metavar="RUN_DIR [key=value ...]", help="run directory, then overrides")
    p.add_argument("--adapter", help="adapter directory (default: RUN_DIR/adapter)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/peft_lora); must not lie inside the run's "
                   "adapter/ or checkpoints/, and must be empty unless --force")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (replacing its files)")

    sub.add_parser("presets", help="list the shipped presets")

    from .bench.registry import list_text

    p = sub.add_parser("bench", help="run the paper-reproduction benchmarks (BENCHMARKS.md)",
                       formatter_class=raw, description="Runs the registered experiment NAME; the options after "
                       "NAME are its own (`hyperadalora bench NAME --help` lists them). Results go to "
                       "benchmarks/results/<name>.json / .md / .png. `all [--group quick] [--data-dir D]` runs every "
                       "registered command (`make bench`, `make bench-quick`), `commands` prints them, "
                       "`render [NAME ...] [--check]` rebuilds the result tables from their JSON.",
                       epilog="benchmarks:\n" + list_text())
    p.add_argument("name", nargs="?", metavar="NAME", help="the benchmark, or all / commands / render "
                   "(none: list them)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="...", help="options of the benchmark")
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
        print(f"hyperadalora: {exc}", file=sys.stderr)
        print(json.dumps({"run_dir": str(exc.result.run_dir), "status": exc.result.status,
                          "steps_done": exc.result.steps_done, "checkpoint_step": exc.result.checkpoint_step}))
        return EXIT_NONFINITE
    metric = result.primary_metric
    value = (result.final_metrics or {}).get(metric)
    print(f"hyperadalora: done in {result.seconds:.1f} s: {config.task} {metric} "
          f"{value if value is None else round(value, 4)} on {(result.final_metrics or {}).get('num_examples')} "
          f"held-out rows; run directory {result.run_dir}", file=sys.stderr)
    print(json.dumps({"run_dir": str(result.run_dir), "status": result.status, "steps_done": result.steps_done,
                      "metrics": result.final_metrics}))
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


def cmd_export(args: argparse.Namespace) -> int:
    from .export import check_export_dir, export_peft_lora
    from .train import load_run, load_trained

    target, overrides = _split_items(args.items, "export")
    if not _is_run_dir(target):
        raise FileNotFoundError(f"export: {target!r} is not a run directory (a folder with config.yaml, as "
                                "`hyperadalora train` writes)")
    config = load_run(target, overrides)
    adapter = Path(args.adapter or Path(target) / "adapter")
    out = Path(args.out or Path(target) / "peft_lora")
    check_export_dir(out, protected=[adapter, Path(target) / "adapter", Path(target) / "checkpoints"],
                     force=args.force)  # before the model loads
    model, _ = load_trained(config, adapter)
    from .models import resolve_model_path

    export_peft_lora(model, out, base_model_name_or_path=str(resolve_model_path(config.model)))
    print(json.dumps({"peft_adapter": str(out)}))
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
    handler = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "bench": cmd_bench}[args.command]
    from .train.rundir import OutputWriteError, RunDirBusyError

    try:
        return handler(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError,
            OutputWriteError, RunDirBusyError) as exc:
        print(f"hyperadalora {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
