"""Throughput and peak memory on one GPU: bf16 and 4-bit bases, our adapters against peft's (issue 23, item 7).

For each model (SmolLM2 causal LM, MPNet classifier), base (``bf16``: bf16 weights and autocast;
``4bit``: NF4 + double quantisation, bf16 compute; ``4bit_ckpt``: that with activation
checkpointing) and variant (our LoRA, AdaLoRA and HyperAdaLoRA; peft's LoRA and AdaLoRA), it
trains ``--warmup`` + ``--steps`` AdamW steps on random tokens (batch ``--batch`` x ``--seq``, r 16
on every linear layer, AdaLoRA pruning 16 -> 8 over the run) and records tokens per second over
the timed steps and the peak GPU memory above what was held before loading
(``torch.cuda.max_memory_allocated``). ``--chunk-bases`` (default ``4bit_ckpt_chunk``) adds our
variants with the causal-LM loss taken 256 positions at a time (causal LMs only: peft has no
chunked loss, a classifier no vocabulary logits). The loading, adapting, stepping and measuring
is :mod:`hyperadalora.bench.scale`, shared with ``scale_cpu``. Each configuration runs once, the
configurations one after another; a failing one is recorded with its error and the others go on;
the result is written after every configuration.

``--random-weights DIR`` builds each model from ``DIR/<model>`` (config and tokenizer files) with
random weights, for a machine that cannot receive the packaged checkpoints (a lent GPU receives
64 MiB): throughput and memory depend on the architecture, not on the weights' values; the losses
are then those of random models. ``benchmarks/gpu/carry.py`` prepares that folder and the wheels;
``benchmarks/gpu/run.sh`` is the whole run on such a machine. ``--smoke`` runs the same code on tiny
random models for 2 steps, so it is known to work without a GPU.

Usage::

    hyperadalora bench scale_gpu [--random-weights .gpu/arch] [--bases bf16,4bit,4bit_ckpt] [--budget-s 300]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

from .. import scale
from ..experiment import Command, experiment
from ..report import markdown_table
from .common import comma_choices, write_results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of :func:`main`."""
    p = argparse.ArgumentParser(prog="hyperadalora bench scale_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models, 2 steps, CPU allowed")
    p.add_argument("--random-weights", metavar="DIR", default="",
                   help="build each model from DIR/<model> (config and tokenizer files) with random weights")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="start no configuration after this many seconds (0: no limit); the rest are recorded as skipped")
    p.add_argument("--models", default=",".join(scale.MODELS))
    p.add_argument("--bases", default="bf16,4bit")
    p.add_argument("--variants", default=",".join(scale.VARIANTS))
    p.add_argument("--chunk-bases", default="4bit_ckpt_chunk", help="bases with the chunked loss ('': none)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--name", default="scale_gpu")
    args = p.parse_args(argv)
    args.model_list = comma_choices(p, args.models, scale.MODELS, "models")
    args.variant_list = comma_choices(p, args.variants, scale.VARIANTS, "variants")
    args.base_list = comma_choices(p, args.bases, scale.SETTINGS, "bases")
    args.chunk_list = comma_choices(p, args.chunk_bases, scale.SETTINGS, "chunk-bases") if args.chunk_bases else []
    if args.smoke:
        args.batch, args.seq, args.warmup, args.steps = min(args.batch, 4), min(args.seq, 16), 2, 2
    return args


def unrunnable(args: argparse.Namespace) -> str | None:
    """Why ``args`` cannot run on this machine (``None``: it can); checked before any work."""
    if not args.smoke and not torch.cuda.is_available():
        return "no GPU: run with --smoke to check the benchmark on the CPU"
    for name in args.model_list if args.random_weights else ():
        if not (Path(args.random_weights) / name / "config.json").is_file():
            return (f"--random-weights {args.random_weights}: {name}/config.json is missing (benchmarks/gpu/carry.py "
                    "copies the packaged models' config and tokenizer files there)")
    return None


def configurations(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """``(model, base, variant)`` to measure: every combination, then our variants on the chunked
    bases (causal LMs only)."""
    plain = [(n, b, v) for n in args.model_list for b in args.base_list for v in args.variant_list]
    chunked = [(n, b, v) for n in args.model_list if scale.MODELS[n] == "causal-lm" for b in args.chunk_list
               for v in args.variant_list if not v.startswith("peft-")]
    return plain + chunked


def measure(name: str, base: str, variant: str, args: argparse.Namespace, folder: Path) -> dict:
    """One configuration: tokens per second over the timed steps, peak memory, final loss."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_folder, vocab = None, 128
    if not args.smoke:
        from transformers import AutoConfig

        from ...models import resolve_model_path

        if args.random_weights:
            model_folder = scale.random_weights_folder(Path(args.random_weights) / name, scale.MODELS[name],
                                                       folder / "random" / name)
        vocab = AutoConfig.from_pretrained(str(model_folder or resolve_model_path(name))).vocab_size
    data = [scale.random_batch(scale.MODELS[name], args.batch, args.seq, vocab, device)]
    row = scale.measure_config(name, scale.SETTINGS[base], variant, data, steps=args.steps, warmup=args.warmup,
                               total_steps=args.warmup + args.steps, r=args.r, device=device,
                               tiny_folder=folder if args.smoke else None, model_folder=model_folder)
    peak = row["peak_mib"] / 1024 if device.type == "cuda" else None  # a CPU process's RSS is not GPU memory
    return {"model": name, "base": base, "variant": variant,
            "tokens_per_s": args.batch * args.seq * args.steps / row["seconds"], "peak_gib": peak,
            "final_loss": row["final_loss"], "seconds": row["seconds"]}


def environment(args: argparse.Namespace) -> dict:
    """The protocol of the run."""
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "smoke": args.smoke,
            "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup, "r": args.r,
            "weights": "tiny random" if args.smoke else "random (packaged architectures)" if args.random_weights
            else "packaged checkpoints"}


def measure_all(args: argparse.Namespace, tmp: Path) -> int:
    """Measures every configuration, writing the result after each; returns 1 if any failed."""
    rows, start = [], time.perf_counter()
    for name, base, variant in configurations(args):
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            rows.append({"model": name, "base": base, "variant": variant, "skipped": "past --budget-s"})
        else:
            try:
                rows.append(measure(name, base, variant, args, tmp))
            except Exception as exc:  # noqa: BLE001  (one failing configuration must not cost the others' figures)
                rows.append({"model": name, "base": base, "variant": variant,
                             "error": f"{type(exc).__name__}: {exc}"[:2000]})
        print(rows[-1], flush=True)
        result = {"environment": environment(args), "rows": rows}
        write_results(args.name, result, render(result))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 1 if any("error" in r for r in rows) else 0


def ratio_cells(row: dict, rows: list[dict]) -> list[str]:
    """Ours against peft's twin on the same model and base: tokens/s and peak memory ratios."""
    twin_name = scale.PEFT_TWIN.get(row["variant"])
    twin = next((r for r in rows if (r["model"], r["base"], r["variant"]) == (row["model"], row["base"], twin_name)
                 and "tokens_per_s" in r), None)
    if twin is None or "tokens_per_s" not in row:
        return ["", ""]
    peak = "" if row["peak_gib"] is None else f"{row['peak_gib'] / twin['peak_gib']:.3f}"
    return [f"{row['tokens_per_s'] / twin['tokens_per_s']:.2f}", peak]


def render(result: dict) -> list[str]:
    """The table of a scale_gpu result."""
    env, rows = result["environment"], result["rows"]
    head = (f"{env['device']}, batch {env['batch']} x {env['seq']} random tokens, r {env['r']} on all linear layers, "
            f"{env['warmup']} warm-up + {env['steps']} timed steps, weights: {env['weights']}; one run of each "
            "configuration, one after another; peak = max GPU memory allocated above what was held before loading.")
    table = []
    for r in rows:
        if "tokens_per_s" not in r:
            note = r.get("error") or r.get("skipped", "")
            table.append([r["model"], r["base"], r["variant"], "", "", "", "", "", note.split("\n")[0][:90]])
            continue
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        speed_vs_twin, peak_vs_twin = ratio_cells(r, rows)
        table.append([r["model"], r["base"], r["variant"], f"{r['tokens_per_s']:,.0f}", speed_vs_twin, peak,
                      peak_vs_twin, f"{r['final_loss']:.3f}", ""])
    return [head, "", *markdown_table(["model", "base", "variant", "tokens/s", "tokens/s / peft twin", "peak GiB",
                                       "peak / peft twin", "final loss", "note"], table)]


@experiment("scale_gpu", section="### Training at scale on one GPU: bf16, 4-bit, 4-bit + checkpointing (issue 23, item 7)",
            title="SmolLM2 / MPNet batch 64 x 128 on a GPU: tokens/s and peak memory of ours vs peft, bf16 / 4-bit",
            parse_args=parse_args, render=render, data=False,
            # Group "gpu": run on a lent GPU by benchmarks/gpu/run.sh, never by make bench (on a CPU it refuses).
            commands=[Command("scale_gpu", ("--random-weights", ".gpu/arch", "--bases", "bf16,4bit,4bit_ckpt",
                                            "--budget-s", "300"), group="gpu"),
                      # The first run, before the hypernetworks followed the model to the GPU (every
                      # HyperAdaLoRA row failed); kept for the run-to-run spread of the other rows.
                      Command("scale_gpu_run1", ("--random-weights", ".gpu/arch", "--budget-s", "330",
                                                 "--name", "scale_gpu_run1"), group="gpu")])
def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns 1 if a configuration failed (its error is in the result)."""
    args = parse_args(argv)
    problem = unrunnable(args)
    if problem:
        print(f"hyperadalora bench scale_gpu: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        return measure_all(args, Path(tmp))
