"""Experiment 7 (paper Table 8): how similar are the P, lam, Q learned by HyperAdaLoRA and AdaLoRA?

Takes the SST-2 / MiniLM / seed-0 runs of the convergence experiment (their adapters are kept in
its work dir) at one learning rate (both methods at the same lr: "the same training"), loads
both adapters, and per adapted module computes the cosine similarity of the flattened P, lam
and Q, and of the update ``dW = P diag(lam * mask) Q`` (invariant to the sign and order of the
singular components, which P, lam, Q alone are not). Reference: both are compared with the
factors they started from (the same seed gives both methods the same initial factors), since
factors that barely move from a shared start are similar for that reason alone.

Writes ``results/similarity.json`` (per module and averaged), ``.md``, ``.png``.

Usage::

    python benchmarks/similarity.py [--lr 1e-3] [--work-dir runs/bench/convergence]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from pathlib import Path

import torch

from common import RESULTS  # benchmarks/ is on sys.path when a script runs
from hyperadalora.bench.report import markdown_table, write_result
from hyperadalora.train.plots import pyplot, short_module_name



def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    den = a.norm() * b.norm()
    return float(a @ b / den) if den > 0 else float("nan")


@torch.no_grad()
def trained_factors(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {P, lam, Q, dW}}`` of a run's saved adapter (generated factors for hyper runs)."""
    from hyperadalora.train import load_run, load_trained

    config = load_run(run_dir)
    model, _ = load_trained(config, run_dir / "adapter")
    model.eval()
    return {name: with_update(layer.get_factors(), layer.rank_mask) for name, layer in model.adapted_layers.items()}


@torch.no_grad()
def initial_factors(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The factors a run started from (built as the training loop builds them)."""
    from hyperadalora.train import build_model, load_run

    config = load_run(run_dir)
    # The hyper source's state starts as the direct factors: build the direct model (same RNG draws).
    model, _, _ = build_model(config.replace(adapter=dataclasses.replace(config.adapter, source="direct")))
    return {name: with_update({k: v.detach().clone() for k, v in layer.factors.items()}, layer.rank_mask)
            for name, layer in model.adapted_layers.items()}


def nanmean(values: list[float]) -> float:
    """Mean of the finite values (NaN when none: a zero vector has no direction, e.g. lam at init)."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else float("nan")


def with_update(f: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {k: f[k].detach().clone() for k in ("P", "lam", "Q")}
    out["dW"] = out["P"] @ torch.diag(out["lam"] * mask) @ out["Q"]  # (out, r) (r, r) (r, in) -> (out, in)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lr", type=float, default=1e-3, help="the lr of both runs")
    p.add_argument("--adalora-lr", type=float, default=None, help="AdaLoRA's lr when it differs (e.g. each "
                   "method's best lr, so that both reached a similar loss)")
    p.add_argument("--task", default="sst2")
    p.add_argument("--work-dir", default="runs/bench/convergence")
    p.add_argument("--name", default="similarity")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    runs = Path(args.work_dir) / "runs"
    lrs = {"adalora": args.adalora_lr or args.lr, "hyperadalora": args.lr}
    dirs = {m: runs / f"{args.task}-minilm-{m}-lr{lrs[m]:g}-s0" for m in ("adalora", "hyperadalora")}
    for m, d in dirs.items():
        if not (d / "adapter" / "adapter_config.json").is_file():
            p.error(f"{d} holds no adapter: run benchmarks/convergence.py first (it keeps the SST-2 / MiniLM / "
                    f"seed-0 adapters in {runs}), or pick an --lr it ran")
    ada, hyp = trained_factors(dirs["adalora"]), trained_factors(dirs["hyperadalora"])
    init_a, init_h = initial_factors(dirs["adalora"]), initial_factors(dirs["hyperadalora"])
    kinds = ("P", "lam", "Q", "dW")
    pairs = {"hyper vs adalora": (hyp, ada), "adalora vs its init": (ada, init_a),
             "hyper vs its init": (hyp, init_h), "init: hyper vs adalora": (init_h, init_a)}
    per_module = []
    for name in ada:
        row = {"module": name}
        for pair, (x, y) in pairs.items():
            for k in kinds:
                row[f"{pair}|{k}"] = cosine(x[name][k], y[name][k])
        per_module.append(row)
    mean = {key: nanmean([r[key] for r in per_module]) for key in per_module[0] if key != "module"}
    table = [[pair] + [f"{mean[f'{pair}|{k}']:.3f}" if math.isfinite(mean[f"{pair}|{k}"]) else "n/a" for k in kinds]
             for pair in pairs]
    at = (f"both at lr {args.lr:g}" if lrs["adalora"] == lrs["hyperadalora"]
          else f"AdaLoRA at lr {lrs['adalora']:g}, HyperAdaLoRA at {lrs['hyperadalora']:g}")
    lines = [f"Cosine similarity of the learned factors, {args.task} / MiniLM, seed 0, {at}, "
             f"mean over the {len(per_module)} adapted modules (n/a: a zero vector, e.g. lam and dW at init, has no direction).", "",
             *markdown_table(["pair", "P", "lam", "Q", "dW = P diag(lam) Q"], table)]
    write_result(RESULTS, args.name, {"config": vars(args), "mean": mean, "per_module": per_module}, lines)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4), dpi=110)
    xs = range(len(per_module))
    for k in kinds:
        ax.plot(xs, [r[f"hyper vs adalora|{k}"] for r in per_module], marker=".", label=f"{k}: hyper vs adalora")
    ax.set_xticks(list(xs), [short_module_name(r["module"]) for r in per_module], rotation=90, fontsize=6)
    ax.set_ylabel("cosine similarity")
    ax.set_title(f"HyperAdaLoRA vs AdaLoRA factors per module ({args.task}, MiniLM, {at})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png")
    plt.close(fig)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
