"""Training SmolLM2-135M at batch 4 x 512 on this CPU: fp32, bf16, 4-bit, 4-bit + checkpointing (issue 23, item 6).

For every setting (:data:`hyperadalora.bench.scale.SETTINGS`) and variant (our LoRA, AdaLoRA,
HyperAdaLoRA; peft's LoRA and AdaLoRA; r 16, alpha 32, all linear layers, AdamW lr 1e-4, packed
Alpaca text), two measurements:

* **peak memory**, each configuration in its own fresh process (:func:`~hyperadalora.bench.scale.measure_in_subprocess`):
  the peak resident set of ``--memory-steps`` training steps above the resident set before the
  model was loaded (so weights + adapters + optimizer state + activations; not the interpreter);
* **step time and loss**, all variants of a setting in one process, taking turns in rounds of
  ``--steps-per-round`` steps, the order reversed every other round (:func:`round_order`); a
  step's time is the process's CPU time (1 thread: the work done, not the waiting on a shared
  machine) and its wall time; ours / peft's twin is taken within each round and summarised by
  the median over rounds (:func:`round_ratios`). Before the rounds every variant takes one
  step on a 1 x 8-token batch (optimizer and allocator state, lazy initialisations), so no
  round holds one-time costs; the loss columns are those of the full steps.

``--extra SETTING:VARIANTS`` measures further configurations for memory only (one process each,
after the rest), whose step time is that process's and not interleaved: for settings too slow
here to time in rounds (bf16 runs ~17x slower than fp32 on this AVX2 CPU, which has no bf16
instructions; the 4-bit settings therefore compute in fp32 here).

Usage::

    hyperadalora bench scale_cpu --data-dir ../shared/data [--rounds 2] [--steps-per-round 1] [--memory-steps 1]
        [--parallel-memory] [--extra bf16:lora,peft-lora]
    hyperadalora bench scale_cpu --smoke    # tiny random Llama, random tokens: checks the code (minutes)
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .. import scale
from ..experiment import Command, experiment
from ..report import machine, markdown_table
from .common import write_results


def round_order(names: list[str], index: int) -> list[str]:
    """The order of round ``index``: ``names`` as given in even rounds, reversed in odd ones."""
    return list(names) if index % 2 == 0 else list(reversed(names))


def round_ratios(rounds: list[dict[str, float]], pairs: dict[str, str]) -> dict[str, dict]:
    """Per-round ratios ``rounds[i][ours] / rounds[i][twin]`` for each ``ours: twin`` in ``pairs``.

    Args:
        rounds: Seconds per step of each variant, one dict per round.
        pairs: Our variant -> the variant it is compared with (only pairs present in every round).

    Returns:
        ``{ours: {"per_round": [...], "median": m}}``.
    """
    out = {}
    for ours, twin in pairs.items():
        if rounds and all(ours in r and twin in r for r in rounds):
            per_round = [r[ours] / r[twin] for r in rounds]
            out[ours] = {"per_round": per_round, "median": statistics.median(per_round)}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of :func:`main`."""
    p = argparse.ArgumentParser(prog="hyperadalora bench scale_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="holds alpaca/train.jsonl (packed into the batches)")
    p.add_argument("--model", default="smollm2", choices=["smollm2"])
    p.add_argument("--settings", default="fp32,4bit_fp32,4bit_fp32_ckpt",
                   help=f"of {', '.join(scale.SETTINGS)}")
    p.add_argument("--memory-settings", default=None,
                   help="the settings whose memory is measured, in this order (default: --settings); with "
                        "--parallel-memory, order them so that the timing and a memory process do not both hold "
                        "the largest setting at once")
    p.add_argument("--variants", default=",".join(scale.VARIANTS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per setting (0: no timing)")
    p.add_argument("--steps-per-round", type=int, default=1)
    p.add_argument("--memory-steps", type=int, default=1, help="full steps of each memory process (0: no memory)")
    p.add_argument("--extra", action="append", default=[], metavar="SETTING:VARIANTS",
                   help="memory only (and that process's step time), after the rest; repeatable")
    p.add_argument("--parallel-memory", action="store_true",
                   help="run the memory processes beside the timing process (two single-thread processes at a time)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, random tokens, 4 x 16")
    p.add_argument("--name", default="scale_cpu")
    args = p.parse_args(argv)
    args.setting_list = [s for s in args.settings.split(",") if s]
    args.variant_list = [v for v in args.variants.split(",") if v]
    args.memory_list = [s for s in (args.memory_settings or args.settings).split(",") if s]
    args.extra_list = [(e.partition(":")[0], [v for v in e.partition(":")[2].split(",") if v]) for e in args.extra]
    named_settings = args.setting_list + args.memory_list + [s for s, _ in args.extra_list]
    named_variants = args.variant_list + [v for _, vs in args.extra_list for v in vs]
    bad = [s for s in named_settings if s not in scale.SETTINGS] + [v for v in named_variants
                                                                    if v not in scale.VARIANTS]
    if bad:
        p.error(f"unknown settings / variants {bad}; settings: {', '.join(scale.SETTINGS)}; "
                f"variants: {', '.join(scale.VARIANTS)}")
    if args.smoke:
        args.seq = min(args.seq, 16)
    elif not args.data_dir:
        p.error("--data-dir is needed (Alpaca text for the batches), or run --smoke")
    args.total_steps = max(args.rounds * args.steps_per_round, args.memory_steps, 4)
    return args


def batches_of(args, tiny_folder: Path | None) -> tuple[list[dict], dict]:
    """The training batches and their description for :func:`scale.measure_in_subprocess`."""
    n = max(args.total_steps, 1)
    if args.smoke:
        return [scale.random_batch("causal-lm", args.batch, args.seq, 128, "cpu", seed=i) for i in range(n)], \
            {"random": [args.batch, args.seq]}
    batches = scale.alpaca_batches(scale.tokenizer_of(args.model), n, args.batch, args.seq, args.data_dir)
    return batches, {"alpaca": [n, args.batch, args.seq, args.data_dir]}


def time_setting(setting: scale.Setting, args, batches: list[dict], tiny_folder: Path | None) -> dict:
    """Every variant of ``setting`` in this process, stepped in interleaved rounds (module docstring)."""
    steps = {v: scale.build(args.model, setting, v, args.total_steps, args.r, torch.device("cpu"),
                            tiny_folder=tiny_folder) for v in args.variant_list}
    warm = scale.short_batch(batches[0])
    warm_losses = {v: step(warm) for v, step in steps.items()}  # optimizer / allocator state, lazy inits
    cpu_rounds, wall_rounds, losses = [], [], {v: [] for v in steps}
    for i in range(args.rounds):
        cpu, wall = {}, {}
        for v in round_order(list(steps), i):
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(args.steps_per_round):
                losses[v].append(steps[v](batches[len(losses[v]) % len(batches)]))
            cpu[v] = (time.process_time() - c0) / args.steps_per_round
            wall[v] = (time.perf_counter() - w0) / args.steps_per_round
        cpu_rounds.append(cpu)
        wall_rounds.append(wall)
        print(f"{setting.name} round {i + 1}/{args.rounds}: " + ", ".join(f"{v} {s:.1f}s" for v, s in cpu.items()),
              flush=True)
    return {"cpu_s": cpu_rounds, "wall_s": wall_rounds, "losses": losses, "warm_losses": warm_losses,
            "cpu_ratios": round_ratios(cpu_rounds, scale.PEFT_TWIN),
            "wall_ratios": round_ratios(wall_rounds, scale.PEFT_TWIN)}


def measure_memory(setting: str, variant: str, args, batch_spec: dict, tiny_folder: Path | None) -> dict:
    """Peak memory of one configuration, in its own process."""
    spec = {"name": args.model, "setting": setting, "variant": variant, "batches": batch_spec,
            "steps": args.memory_steps, "warmup": 0, "warm": True, "total_steps": args.total_steps, "r": args.r,
            "tiny_folder": str(tiny_folder) if tiny_folder else None}
    row = scale.measure_in_subprocess(spec, args.threads)
    print(f"memory {setting} {variant}: peak {row['peak_mib']:.0f} MiB", flush=True)
    return row


def cell(value, spec: str = ".0f") -> str:
    """``format(value, spec)``, or empty for ``None``."""
    return "" if value is None else format(value, spec)


def summary_rows(result: dict) -> list[dict]:
    """One dict per measured configuration: memory, times, losses, ratios against peft's twin."""
    rows = []
    c = result["config"]
    settings = list(dict.fromkeys([*c["settings"], *c.get("memory_settings", [])]))
    configs = [(s, v) for s in settings for v in c["variants"]] + [(s, v) for s, vs in c["extra"] for v in vs]
    for s, v in configs:
        timed = result["timing"].get(s)
        mem = result["memory"].get(s, {}).get(v)
        twin_mem = result["memory"].get(s, {}).get(scale.PEFT_TWIN.get(v, ""))
        row = {"setting": s, "variant": v, "peak": mem and mem["peak_mib"], "model": mem and mem["model_mib"],
               "peak_vs_twin": mem and twin_mem and mem["peak_mib"] / twin_mem["peak_mib"]}
        if timed and v in timed["losses"]:
            row.update(cpu=statistics.median(r[v] for r in timed["cpu_s"]),
                       wall=statistics.median(r[v] for r in timed["wall_s"]),
                       cpu_ratio=timed["cpu_ratios"].get(v, {}).get("median"),
                       first_loss=timed["losses"][v][0], last_loss=timed["losses"][v][-1],
                       steps=len(timed["losses"][v]))
        elif mem:  # a memory-only configuration: its own process's steps, not interleaved
            row.update(cpu=mem["cpu_seconds"] / len(mem["losses"]), wall=mem["seconds"] / len(mem["losses"]),
                       first_loss=mem["losses"][0], last_loss=mem["final_loss"], steps=len(mem["losses"]),
                       alone=True)
        rows.append(row)
    return rows


def goal_rows(result: dict) -> list[list[str]]:
    """The two memory goals for each of our variants at each 4-bit + checkpointing setting measured.

    A ``_chunk`` setting's peft twin is taken at the same setting without the chunked loss (peft
    computes the whole logits); "our fp32 run" is always the plain ``fp32`` setting's.
    """
    mem, c = result["memory"], result["config"]
    named = dict.fromkeys([*c["settings"], *c.get("memory_settings", []), *(s for s, _ in c["extra"])])
    out = []
    for s in (s for s in named if scale.SETTINGS[s].quantize and scale.SETTINGS[s].checkpointing):
        for v in ("lora", "adalora", "hyperadalora"):
            ours = mem.get(s, {}).get(v)
            if not ours:
                continue
            qlora = mem.get(s.removesuffix("_chunk"), {}).get(scale.PEFT_TWIN[v])
            fp32 = mem.get("fp32", {}).get(v)
            vs_peft = qlora and ours["peak_mib"] / qlora["peak_mib"]
            vs_fp32 = fp32 and ours["peak_mib"] / fp32["peak_mib"]
            out.append([s, v, scale.PEFT_TWIN[v], cell(vs_peft, ".3f"), "" if vs_peft is None else
                        ("yes" if vs_peft <= 1.05 else "no"), cell(vs_fp32, ".3f"),
                        "" if vs_fp32 is None else ("yes" if vs_fp32 <= 0.35 else "no")])
    return out


def render(result: dict) -> list[str]:
    """The tables of a scale_cpu result."""
    c = result["config"]
    head = (f"{c['model']}, batch {c['batch']} x {c['seq']}, r {c['r']}, {c['threads']} thread(s) "
            f"({result['machine']['device']}); memory: peak RSS over {c['memory_steps']} step(s), one process per "
            f"configuration, after a 1 x 8-token warm step; time: {c['rounds']} interleaved round(s) of "
            f"{c['steps_per_round']} step(s) after the same warm step, process CPU time, median over rounds; load average {c['load']} at the start.")
    table = [[r["setting"] + (" (alone)" if r.get("alone") else ""), r["variant"], cell(r["peak"]), cell(r["model"]), cell(r["peak_vs_twin"], ".3f"),
              cell(r.get("cpu"), ".1f"), cell(r.get("wall"), ".1f"), cell(r.get("cpu_ratio"), ".3f"),
              cell(r.get("first_loss"), ".3f"), cell(r.get("last_loss"), ".3f"), cell(r.get("steps"), "d")]
             for r in summary_rows(result)]
    return [head, "", *markdown_table(["setting", "variant", "peak MiB", "model MiB", "peak / peft twin",
                                       "CPU s/step", "wall s/step", "CPU time / peft twin", "first loss",
                                       "last loss", "steps"], table),
            "", *markdown_table(["setting", "ours", "peft twin", "4-bit+ckpt peak / peft's (goal <= 1.05)", "holds",
                                 "4-bit+ckpt peak / our fp32 (goal <= 0.35)", "holds"], goal_rows(result))]


@experiment("scale_cpu", section="### Training at scale on this CPU: fp32, bf16, 4-bit, 4-bit + checkpointing (issue 23, item 6)",
            title="SmolLM2 4 x 512: peak memory, step time, loss of ours vs peft in fp32 / bf16 / 4-bit / 4-bit + ckpt",
            parse_args=parse_args, render=render,
            commands=[Command("scale_cpu", ("--settings", "fp32,4bit_fp32_ckpt,4bit_fp32", "--memory-settings",
                                            "4bit_fp32_ckpt,fp32,4bit_fp32", "--parallel-memory", "--extra", "bf16:lora")),
                      # The chunked causal-LM loss (loss_chunk_tokens=256): memory only, beside the plain
                      # 4-bit + checkpointing and fp32 runs of LoRA measured again in the same session.
                      Command("scale_cpu_chunked", ("--settings", "", "--rounds", "0", "--memory-settings",
                                                    "4bit_fp32_ckpt_chunk", "--variants", "lora,adalora,hyperadalora",
                                                    "--extra", "4bit_fp32_ckpt:lora,peft-lora,peft-adalora",
                                                    "--extra", "fp32_chunk:lora",
                                                    "--extra", "fp32:lora,adalora,hyperadalora",
                                                    "--name", "scale_cpu_chunked")),
                      # 100 steps (the item's loss check) at a batch this CPU can afford, 1 x 128: each
                      # configuration's losses, our LoRA against peft's, fp32 against 4-bit + ckpt
                      # (2.7-5.2 CPU seconds a step here, so only the LoRA pair ran).
                      Command("scale_cpu_100steps", ("--settings", "", "--rounds", "0", "--memory-settings",
                                                     "fp32,4bit_fp32_ckpt", "--variants", "lora,peft-lora",
                                                     "--batch", "1", "--seq", "128", "--memory-steps", "100",
                                                     "--name", "scale_cpu_100steps")),
                      # The AdaLoRA pair likewise, one process per setting (run side by side on the 2 cores).
                      *(Command(f"scale_cpu_100steps_adalora_{s}", ("--settings", "", "--rounds", "0",
                                                                    "--memory-settings", s, "--variants",
                                                                    "adalora,peft-adalora", "--batch", "1", "--seq",
                                                                    "128", "--memory-steps", "100", "--name",
                                                                    f"scale_cpu_100steps_adalora_{s}"))
                        for s in ("fp32", "4bit_fp32_ckpt")),
                      # HyperAdaLoRA likewise (no peft twin), both settings in one invocation.
                      Command("scale_cpu_100steps_hyperadalora", ("--settings", "", "--rounds", "0",
                                                                  "--memory-settings", "fp32,4bit_fp32_ckpt",
                                                                  "--variants", "hyperadalora", "--batch", "1", "--seq",
                                                                  "128", "--memory-steps", "100", "--name",
                                                                  "scale_cpu_100steps_hyperadalora")),
                      # bf16 at 4 x 512, memory only (one full bf16 step costs ~15x fp32's here). Stopped
                      # after its first three configurations: the AdaLoRA pair ran in a second process.
                      Command("scale_cpu_bf16", ("--settings", "", "--rounds", "0", "--memory-settings", "bf16",
                                                 "--variants", "lora,peft-lora,hyperadalora,adalora,peft-adalora",
                                                 "--name", "scale_cpu_bf16")),
                      Command("scale_cpu_bf16_adalora", ("--settings", "", "--rounds", "0", "--memory-settings",
                                                         "bf16", "--variants", "adalora,peft-adalora", "--name",
                                                         "scale_cpu_bf16_adalora"))])
def main(argv: list[str] | None = None) -> int:
    """Measures memory (a process per configuration), then time and loss (a process per setting)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"machine": machine(), "config": {"model": args.model, "batch": args.batch, "seq": args.seq, "r": args.r,
                         "threads": args.threads, "rounds": args.rounds, "steps_per_round": args.steps_per_round,
                         "memory_steps": args.memory_steps, "parallel_memory": args.parallel_memory, "total_step": args.total_steps, "smoke": args.smoke,
                         "settings": args.setting_list, "memory_settings": args.memory_list, "variants": args.variant_list, "extra": args.extra_list, "optimizer": "AdamW lr 1e-4",
                         "load": round(os.getloadavg()[0], 2),
                         "memory": "peak VmHWM - VmRSS before loading, fresh process, MALLOC_MMAP_THRESHOLD_=65536",
                         "data": "random tokens" if args.smoke else "Alpaca train, packed"},
              "memory": {}, "timing": {}}
    lock = threading.Lock()

    def record(key: str, setting: str, value, variant: str | None = None) -> None:
        with lock:  # written after each configuration: a long run that is stopped keeps what it measured
            if variant is None:
                result[key][setting] = value
            else:
                result[key].setdefault(setting, {})[variant] = value
            write_results(args.name, result, render(result))

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(1) as beside:
        tiny = Path(tmp) if args.smoke else None
        batches, spec = batches_of(args, tiny)

        def memory_runs(configs) -> None:
            for s, v in configs:
                record("memory", s, measure_memory(s, v, args, spec, tiny), v)

        configs = [(s, v) for s in args.memory_list for v in args.variant_list] if args.memory_steps else []
        extra = [(s, v) for s, vs in args.extra_list for v in vs]
        pending = beside.submit(memory_runs, configs + extra) if args.parallel_memory else None
        if pending is None:
            memory_runs(configs)
        for s in args.setting_list if args.rounds else ():
            record("timing", s, time_setting(scale.SETTINGS[s], args, batches, tiny))
            gc.collect()
        if pending is None:
            memory_runs(extra)
        else:
            pending.result()
    print("\n".join(render(result)))
    return 0
