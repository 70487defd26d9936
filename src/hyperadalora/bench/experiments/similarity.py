"""Experiment 7 (paper Table 8): how similar are the P, lam, Q learned by HyperAdaLoRA and AdaLoRA?

Takes the SST-2 / MiniLM / seed-0 runs of the convergence experiment (their adapters are kept in
its work dir) at one learning rate (both methods at the same lr: "the same training"), loads
both adapters, and per adapted module computes the cosine similarity of the flattened P, lam
and Q, and of the update ``dW = P diag(lam * mask) Q`` (invariant to the sign and order of the
singular components, which P, lam, Q alone are not). Reference: both are compared with the
factors they started from (the same seed gives both methods the same initial factors), since
factors that barely move from a shared start are similar for that reason alone. Control
(``--control-seed N``): AdaLoRA against AdaLoRA of seed N at the same lr (its adapter kept; trained
when not cached), how alike two runs of one method are.

A module whose update is the zero matrix in a run (every singular value masked by the allocation)
has no dW direction there: its cosine is 0/0 (NaN), left out of that mean, and the table says over
how many modules such a mean is.

Writes ``results/similarity.json`` (per module and averaged), ``.md``, ``.png``.

Usage::

    hyperadalora bench similarity [--lr 1e-3] [--work-dir runs/bench/convergence] [--control-seed 1 --data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
from pathlib import Path

import torch

from ...train.plots import pyplot, short_module_name
from ..experiment import Command, experiment
from ..report import markdown_table
from .common import result_path, write_results

KINDS = ("P", "lam", "Q", "dW")
PAIRS = ("hyper vs adalora", "adalora vs its init", "hyper vs its init", "init: hyper vs adalora")
CONTROL = "adalora vs adalora seed {seed}"


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    den = a.norm() * b.norm()
    return float(a @ b / den) if den > 0 else float("nan")


@torch.no_grad()
def trained_factors(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {P, lam, Q, dW}}`` of a run's saved adapter (generated factors for hyper runs)."""
    from ...train import load_run, load_trained

    config = load_run(run_dir)
    model, _ = load_trained(config, run_dir / "adapter")
    model.eval()
    return {name: with_update(layer.get_factors(), layer.rank_mask) for name, layer in model.adapted_layers.items()}


@torch.no_grad()
def initial_factors(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The factors a run started from (built as the training loop builds them)."""
    from ...train import build_model, load_run

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of :func:`main` (the parser is kept as ``args.parser``)."""
    p = argparse.ArgumentParser(prog="hyperadalora bench similarity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lr", type=float, default=1e-3, help="the lr of both runs")
    p.add_argument("--adalora-lr", type=float, default=None, help="AdaLoRA's lr when it differs (e.g. each "
                   "method's best lr, so that both reached a similar loss)")
    p.add_argument("--task", default="sst2")
    p.add_argument("--control-seed", type=int, default=None, help="also compare AdaLoRA with AdaLoRA of this seed "
                   "at the same lr (trained, adapter kept, when not cached)")
    p.add_argument("--data-dir", default=None, help="data directory (to train the runs that are not cached)")
    p.add_argument("--work-dir", default="runs/bench/convergence")
    p.add_argument("--name", default="similarity")
    args = p.parse_args(argv)
    args.parser = p
    return args


def method_lrs(config: dict) -> dict[str, float]:
    """The lr of each method's run (``adalora_lr``, absent or ``None``: the same as HyperAdaLoRA's)."""
    return {"adalora": config.get("adalora_lr") or config["lr"], "hyperadalora": config["lr"]}


def render(result: dict) -> list[str]:
    """The table of a similarity result: mean cosine per pair and factor."""
    c, mean = result["config"], result["mean"]
    lrs = method_lrs(c)
    pairs = [*PAIRS, *dict.fromkeys(k.partition("|")[0] for k in mean if k.startswith("adalora vs adalora"))]
    table = [[pair] + [f"{mean[f'{pair}|{k}']:.3f}" if math.isfinite(mean[f"{pair}|{k}"]) else "n/a" for k in KINDS]
             for pair in pairs]
    partial = "".join(f"{note}; " for note in partial_means(result["per_module"]))
    intro = (f"Cosine similarity of the learned factors, {c['task']} / MiniLM, seed 0, {at_lrs(lrs)}, mean over "
             f"the {len(result['per_module'])} adapted modules ({partial}n/a: a zero vector, e.g. lam and dW at init, "
             "has no direction).")
    return [intro, "",
            *markdown_table(["pair", "P", "lam", "Q", "dW = P diag(lam) Q"], table)]


def partial_means(per_module: list[dict]) -> list[str]:
    """``hyper vs adalora dW: over the 33 where both are non-zero`` for each mean that left out modules."""
    n = len(per_module)
    counts = {key: sum(math.isfinite(r[key]) for r in per_module) for key in per_module[0] if key != "module"}
    return [f"{key.replace('|', ' ')}: over the {c} where both are non-zero" for key, c in counts.items() if 0 < c < n]


def convergence_spec(args: argparse.Namespace, method: str, lr: float, seed: int):
    """The convergence experiment's run of ``method`` at ``lr`` and ``seed``, its adapter kept."""
    from . import convergence as conv

    spec = conv.spec(args.task, "minilm", method, lr, seed, conv.TASKS)
    return dataclasses.replace(spec, keep_run_dir=True)  # same key: a cached run without its adapter runs again


def kept_run_dir(args: argparse.Namespace, method: str, lr: float, seed: int) -> Path:
    """The directory of :func:`convergence_spec`'s run (trained when not cached)."""
    from ..runner import run_specs

    spec = convergence_spec(args, method, lr, seed)
    return Path(run_specs([spec], args.work_dir, args.data_dir)[spec.key]["run_dir"])


def at_lrs(lrs: dict[str, float]) -> str:
    """``both at lr 0.001`` or ``AdaLoRA at lr 0.003, HyperAdaLoRA at 0.001``."""
    return (f"both at lr {lrs['hyperadalora']:g}" if lrs["adalora"] == lrs["hyperadalora"]
            else f"AdaLoRA at lr {lrs['adalora']:g}, HyperAdaLoRA at {lrs['hyperadalora']:g}")


@experiment("similarity", section="## 7. Similarity of the learned P, lam, Q (Table 8)",
            title="7. cosine similarity of P, lam, Q: HyperAdaLoRA vs AdaLoRA", parse_args=parse_args, render=render,
            commands=[Command("similarity", ("--lr", "1e-3")),
                      Command("similarity_best_lr", ("--lr", "1e-3", "--adalora-lr", "3e-3",
                                                     "--name", "similarity_best_lr")),
                      # What a dW cosine between two AdaLoRA runs (seeds 0 and 1) is, to compare 0.03 with.
                      Command("similarity_best_lr_control", ("--lr", "1e-3", "--adalora-lr", "3e-3",
                                                             "--control-seed", "1",
                                                             "--name", "similarity_best_lr_control"))])
def main(argv: list[str] | None = None) -> int:
    """Compares the kept adapters of the two convergence runs and writes ``results/<name>.*``."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    runs = Path(args.work_dir) / "runs"
    lrs = method_lrs(vars(args))
    for m in ("adalora", "hyperadalora"):
        d = runs / convergence_spec(args, m, lrs[m], 0).key
        if args.data_dir is None and not (d / "adapter" / "adapter_config.json").is_file():
            args.parser.error(f"{d} holds no adapter: give --data-dir to train it, or run `hyperadalora bench "
                              f"convergence` first (it keeps the SST-2 / MiniLM / seed-0 adapters in {runs})")
    dirs = {m: kept_run_dir(args, m, lrs[m], 0) for m in ("adalora", "hyperadalora")}
    ada, hyp = trained_factors(dirs["adalora"]), trained_factors(dirs["hyperadalora"])
    init_a, init_h = initial_factors(dirs["adalora"]), initial_factors(dirs["hyperadalora"])
    pairs = dict(zip(PAIRS, ((hyp, ada), (ada, init_a), (hyp, init_h), (init_h, init_a))))
    if args.control_seed is not None:
        control = kept_run_dir(args, "adalora", lrs["adalora"], args.control_seed)
        pairs[CONTROL.format(seed=args.control_seed)] = (trained_factors(control), ada)
    per_module = [{"module": name, **{f"{pair}|{k}": cosine(x[name][k], y[name][k])
                                      for pair, (x, y) in pairs.items() for k in KINDS}} for name in ada]
    mean = {key: nanmean([r[key] for r in per_module]) for key in per_module[0] if key != "module"}
    config = {k: v for k, v in vars(args).items() if k != "parser"}
    result = {"config": config, "mean": mean, "per_module": per_module}
    lines = render(result)
    write_results(args.name, result, lines)
    plot(per_module, args.name, f"HyperAdaLoRA vs AdaLoRA factors per module ({args.task}, MiniLM, {at_lrs(lrs)})")
    print("\n".join(lines))
    return 0


def plot(per_module: list[dict], name: str, title: str) -> None:
    """``<name>.png``: the hyper-vs-AdaLoRA cosine of each factor per module."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4), dpi=110)
    xs = range(len(per_module))
    for k in KINDS:
        ax.plot(xs, [r[f"hyper vs adalora|{k}"] for r in per_module], marker=".", label=f"{k}: hyper vs adalora")
    ax.set_xticks(list(xs), [short_module_name(r["module"]) for r in per_module], rotation=90, fontsize=6)
    ax.set_ylabel("cosine similarity")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(result_path(name))
    plt.close(fig)
