"""Experiment 3 (paper Tables 2, 3, 10): the hypernetwork for LoRA, DoRA, DyLoRA and AdaLoRA.

SmolLM2-135M-Instruct on GSM8K at the CPU scale of ``nlg.py`` (same options; the AdaLoRA pair is
shared with it): each method with and without the hypernetwork, same lr, seed and data order.
Per pair the target is the direct method's smoothed training loss at its last step. Quality:
GSM8K exact match on the first ``--gsm8k-rows`` test problems and HumanEval pass@1 (greedy, run
in the sandbox; the chat prompt of ``hyperadalora.tasks.humaneval_prompt``) on the first
``--humaneval-rows`` problems (all 164 at ``--humaneval-rows 164``, which costs several times the
training on this CPU; the evaluations run ``--workers`` at a time, like the training runs); the base model
without adapter is the reference row. Writes ``results/generality.*``.

Usage::

    python benchmarks/generality.py --data-dir ../shared/data [--steps 30] [--humaneval-rows 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nlg import METHOD_ADAPTERS, RESULTS, scale_args, smollm2_spec  # noqa: E402

from hyperadalora.bench.curves import first_reach  # noqa: E402
from hyperadalora.bench.humaneval import humaneval_many  # noqa: E402
from hyperadalora.bench.report import fmt, markdown_table, plot_curve_groups, write_result  # noqa: E402
from hyperadalora.bench.runner import run_specs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scale_args(p, steps=30)
    p.add_argument("--methods", default="lora,dora,dylora,adalora")
    p.add_argument("--gsm8k-rows", type=int, default=16)
    p.add_argument("--humaneval-rows", type=int, default=16)
    p.add_argument("--name", default="generality")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHOD_ADAPTERS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHOD_ADAPTERS)}")
    specs = [smollm2_spec("gsm8k", m, hyper, args, keep_run_dir=True) for m in methods for hyper in (False, True)]
    if args.gsm8k_rows != 16:  # nlg.py's AdaLoRA runs evaluate 16 problems: share them only then
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
    base_he = he.get("base")
    rows, table, panels, targets = [], [], {}, {}
    for m in methods:
        pair = [s for s in specs if s.tags["method"] in (m, "hyper" + m)]
        direct = results.get(pair[0].key)
        target = direct["final_smoothed"] if direct else None
        targets[m] = target
        panels[m] = {}
        for s in pair:
            r = results.get(s.key)
            if r is None:
                continue
            steps, secs = first_reach(r["losses"], r["step_times"], target) if target is not None else (None, None)
            em = (r["final_metrics"] or {}).get("exact_match")
            pass1 = he[s.key]["metrics"].get("pass@1") if s.key in he else None
            rows.append({"method": s.tags["method"], "target_loss": target, "steps_to_target": steps,
                         "seconds_to_target": secs, "final_smoothed_loss": r["final_smoothed"],
                         "seconds_per_step": sum(r["step_times"]) / len(r["step_times"]),
                         "gsm8k_exact_match": em, "humaneval_pass@1": pass1, "diverged": r["diverged"]})
            table.append([s.tags["method"], fmt(r["final_smoothed"]), fmt(steps, ".0f"), fmt(secs, ".0f"),
                          f"{rows[-1]['seconds_per_step']:.2f}", fmt(em, ".3f", "n/a"), fmt(pass1, ".3f", "n/a")])
            panels[m][s.tags["method"]] = [r["losses"]]
    if base_he:
        table.append(["base model (no adapter)", "", "", "", "", "", fmt(base_he["metrics"].get("pass@1"), ".3f")])
    lines = [f"SmolLM2-135M-Instruct on GSM8K, {args.steps} steps of batch {args.batch_size} x <= {args.max_length} "
             f"tokens, lr {args.lr:g}, seed {args.seed}; target per pair = the direct method's final smoothed loss; "
             f"GSM8K exact match on the first {args.gsm8k_rows} test problems, HumanEval pass@1 (greedy) on the first "
             f"{args.humaneval_rows} problems.", "",
             *markdown_table(["method", "final loss", "steps to target", "s to target", "s/step", "GSM8K EM",
                              "HumanEval pass@1"], table)]
    config = {k: v for k, v in vars(args).items()}
    write_result(RESULTS, args.name, {"config": config, "rows": rows,
                                      "base_model_humaneval": base_he["metrics"] if base_he else None}, lines)
    plot_curve_groups({}, RESULTS / f"{args.name}.png", "SmolLM2 / GSM8K: each method with and without hypernetwork",
                      target=targets, panels={m: g for m, g in panels.items() if g})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
