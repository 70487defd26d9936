"""Experiment 3 (paper Tables 2, 3, 10): the hypernetwork for LoRA, DoRA, DyLoRA and AdaLoRA.

SmolLM2-135M-Instruct on GSM8K at the CPU scale of the nlg experiment (same options; the AdaLoRA pair is
shared with it): each method with and without the hypernetwork, same lr, seed and data order.
Per pair the target is the direct method's smoothed training loss at its last step. Quality:
GSM8K exact match on the first ``--gsm8k-rows`` test problems and HumanEval pass@1 (greedy, run
in the sandbox; the chat prompt of ``hyperadalora.tasks.humaneval_prompt``) on the first
``--humaneval-rows`` problems (all 164 at ``--humaneval-rows 164``, which costs several times the
training on this CPU; the evaluations run ``--workers`` at a time, like the training runs); the base model
without adapter is the reference row. Writes ``results/generality.*``.

Usage::

    hyperadalora bench generality --data-dir ../shared/data [--steps 30] [--humaneval-rows 16]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..curves import first_reach
from ..humaneval import humaneval_many
from ..experiment import Command, experiment
from ..report import fmt, markdown_table, plot_curve_groups
from ..runner import run_specs
from .common import comma_choices, result_path, write_results
from .nlg import METHOD_ADAPTERS, scale_args, smollm2_spec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of :func:`main` (methods checked)."""
    p = argparse.ArgumentParser(prog="hyperadalora bench generality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    scale_args(p, steps=30)
    p.add_argument("--methods", default="lora,dora,dylora,adalora")
    p.add_argument("--gsm8k-rows", type=int, default=16)
    p.add_argument("--humaneval-rows", type=int, default=16)
    p.add_argument("--name", default="generality")
    args = p.parse_args(argv)
    comma_choices(p, args.methods, METHOD_ADAPTERS, "methods")
    return args


def render(result: dict) -> list[str]:
    """The table of a generality result: each method with and without hypernetwork, then the base model."""
    c = result["config"]
    table = [[r["method"], fmt(r["final_smoothed_loss"]), fmt(r["steps_to_target"], ".0f"),
              fmt(r["seconds_to_target"], ".0f"), f"{r['seconds_per_step']:.2f}",
              fmt(r["gsm8k_exact_match"], ".3f", "n/a"),
              fmt(r["humaneval_pass@1"], ".3f", "n/a")] for r in result["rows"]]
    if result.get("base_model_humaneval"):
        table.append(["base model (no adapter)", "", "", "", "", "",
                      fmt(result["base_model_humaneval"].get("pass@1"), ".3f")])
    return [f"SmolLM2-135M-Instruct on GSM8K, {c['steps']} steps of batch {c['batch_size']} x <= {c['max_length']} "
            f"tokens, lr {c['lr']:g}, seed {c['seed']}; target per pair = the direct method's final smoothed loss; "
            f"GSM8K exact match on the first {c['gsm8k_rows']} test problems, HumanEval pass@1 (greedy) on the first "
            f"{c['humaneval_rows']} problems.", "",
            *markdown_table(["method", "final loss", "steps to target", "s to target", "s/step", "GSM8K EM",
                             "HumanEval pass@1"], table)]


SCALED = ("--steps", "100", "--batch-size", "4", "--gsm8k-rows", "32")


def command(result: str, *args: str, group: str = "full") -> Command:
    """A registered generality command writing ``result``."""
    return Command(result, (*args, "--name", result), group=group)


#: The lrs of the scaled LoRA / DoRA / DyLoRA check whose results are committed (the others are pending).
SCALED_LRS_RUN = ("3e-4", "3e-3")


@experiment("generality", section="## 3. Generality (Tables 2, 3, 10): LoRA, DoRA, DyLoRA, AdaLoRA with and "
            "without hypernetwork",
            title="3. LoRA / DoRA / DyLoRA / AdaLoRA with and without hypernetwork, SmolLM2",
            parse_args=parse_args, render=render,
            commands=[Command("generality"),
                      command("generality_humaneval164", "--methods", "lora,adalora", "--humaneval-rows", "164"),
                      command("generality_scaled", *SCALED),
                      command("generality_scaled_humaneval164", "--methods", "dora,adalora", *SCALED,
                              "--humaneval-rows", "164"),
                      command("generality_scaled_humaneval164_lora_dylora", "--methods", "lora,dylora", *SCALED,
                              "--humaneval-rows", "164"),
                      # The verdicts on LoRA / DoRA / DyLoRA came from one shared lr (1e-3): each pair's own best.
                      *(command(f"generality_scaled_lr{lr}", "--methods", "lora,dora,dylora", *SCALED, "--lr", lr,
                                group="full" if lr in SCALED_LRS_RUN else "pending")
                        for lr in ("3e-4", "3e-3", "1e-2"))])
def main(argv: list[str] | None = None) -> int:
    """Trains each method with and without hypernetwork, evaluates them, writes ``results/<name>.*``."""
    args = parse_args(argv)
    methods = args.methods.split(",")
    specs = [smollm2_spec("gsm8k", m, hyper, args, keep_run_dir=True) for m in methods for hyper in (False, True)]
    if args.gsm8k_rows != 16:  # the nlg experiment's AdaLoRA runs evaluate 16 problems: share them only then
        specs = [dataclasses.replace(s, key=s.key + f"-g{args.gsm8k_rows}",
                                     overrides={**s.overrides, "eval_rows": args.gsm8k_rows}) for s in specs]
    results = run_specs(specs, args.work_dir, args.data_dir, args.workers, args.threads,
                        only_cached=args.report_only)
    # "-v2": the chat prompt of hyperadalora.tasks.humaneval_prompt; the first protocol gave the instruct
    # model the bare stub, which it answered with prose (0 for every model), so those results are not reused.
    he_dir = Path(args.work_dir) / f"humaneval{args.humaneval_rows}-v2"
    he_jobs = {"base": None} | {key: Path(r["run_dir"]) for key, r in results.items()
                                if r.get("run_dir") and Path(r["run_dir"]).is_dir()}
    he = humaneval_many(he_jobs, he_dir, args.humaneval_rows, args.data_dir, args.workers, args.threads,
                        only_cached=args.report_only)
    rows, panels, targets = pair_rows(methods, specs, results, he)
    config = {k: v for k, v in vars(args).items()}
    result = {"config": config, "rows": rows,
              "base_model_humaneval": he["base"]["metrics"] if he.get("base") else None}
    lines = render(result)
    write_results(args.name, result, lines)
    plot_curve_groups({}, result_path(args.name), "SmolLM2 / GSM8K: each method with and without hypernetwork",
                      target=targets, panels={m: g for m, g in panels.items() if g})
    print("\n".join(lines))
    return 0


def pair_rows(methods: list[str], specs: list, results: dict, he: dict) -> tuple[list[dict], dict, dict]:
    """The rows (each run against its direct twin's final loss), the plot panels and the targets."""
    rows, panels, targets = [], {}, {}
    for m in methods:
        pair = [s for s in specs if s.tags["method"] in (m, "hyper" + m)]
        direct = results.get(pair[0].key)
        target = targets[m] = direct["final_smoothed"] if direct else None
        panels[m] = {}
        for s in pair:
            r = results.get(s.key)
            if r is None:
                continue
            steps, secs = first_reach(r["losses"], r["step_times"], target) if target is not None else (None, None)
            rows.append({"method": s.tags["method"], "target_loss": target, "steps_to_target": steps,
                         "seconds_to_target": secs, "final_smoothed_loss": r["final_smoothed"],
                         "seconds_per_step": sum(r["step_times"]) / len(r["step_times"]),
                         "gsm8k_exact_match": (r["final_metrics"] or {}).get("exact_match"),
                         "humaneval_pass@1": he[s.key]["metrics"].get("pass@1") if s.key in he else None,
                         "diverged": r["diverged"]})
            panels[m][s.tags["method"]] = [r["losses"]]
    return rows, panels, targets
