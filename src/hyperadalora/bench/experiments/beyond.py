"""Experiments 8 and 9: our own questions beyond the paper, on SST-2 / MiniLM.

* Token layouts of the hypernetwork input (DESIGN.md section 2): ``rank`` (default), ``patch``,
  ``rows``; ``elements`` is not trained here: one step costs 21-215 direct steps on this CPU
  (``results/step_cost_hyper_slow_layouts.md``, ``step_cost_hyper_elements_attention.md``).
* State update modes: ``anchored`` (our default), ``reparam``, ``recurrent`` (the paper's
  Eqs. 4-6: the state integrates the generated output every step).
* Allocation policies: AdaLoRA's smoothed sensitivity x uncertainty (default) vs ``sigma-grad``
  (HyperAdaLoRA Appendix D), for HyperAdaLoRA and for AdaLoRA.
* Why (experiment 9): the naive generated step (``output_scale`` 1 instead of 1/sqrt(h)) and the
  symmetry trap of zero-initialised factors (no per-module / per-rank context embeddings).
* Cost (issue 4's goal): a 64-wide ``lam`` hypernetwork, and every hypernetwork 128 wide instead
  of TinyBERT's 312 (``results/step_cost_goal_b16.md``: 1.59 M instead of 5.87 M parameters).

All at one lr (``--lr``, default 1e-3) with the convergence protocol (the default variant and
the AdaLoRA baseline are convergence runs themselves). Writes ``results/beyond.*``.

Usage::

    hyperadalora bench beyond --data-dir ../shared/data [--no-rows] [--seeds 1]
"""

from __future__ import annotations

import argparse

from ..experiment import Command, experiment
from . import study
from .study import Variant

TITLE = "beyond the paper: layouts, modes, allocation, step size, symmetry"

VARIANTS = [
    Variant("rank layout, anchored, 312 wide (the paper's size)"),
    Variant("patch layout", overrides={"adapter.hyper.tokens": "patch"}, tag="-patch"),
    Variant("rows layout", overrides={"adapter.hyper.tokens": "rows"}, tag="-rows"),
    Variant("reparam mode", overrides={"adapter.hyper.mode": "reparam"}, tag="-reparam"),
    Variant("recurrent mode (paper)", overrides={"adapter.hyper.mode": "recurrent"}, tag="-recurrent"),
    Variant("sigma-grad allocation", overrides={"adapter.allocator.policy": "sigma-grad"}, tag="-sigmagrad"),
    Variant("AdaLoRA, sigma-grad allocation", method="adalora", overrides={"adapter.allocator.policy": "sigma-grad"},
            tag="-sigmagrad"),
    Variant("output scale 1 (naive step size)", overrides={"adapter.hyper.output_scale": 1.0}, tag="-scale1"),
    Variant("no context embeddings (symmetry)", overrides={"adapter.hyper.context": False}, tag="-nocontext"),
    Variant("lam hypernetwork 64 wide", overrides={"adapter.hyper.lam_hidden": 64}, tag="-lamh64"),
    Variant("hypernetworks 128 wide (our default)", overrides={"adapter.hyper.hidden": 128}, tag="-h128"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The study's options, with ``--no-rows`` and ``--only``."""
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--no-rows", action="store_true",
                       help="skip the rows layout (about 4x the time of a direct step)")
        p.add_argument("--only", default="", help="run only these variants (their tags without the dash, e.g. "
                       "h128,lamh64) beside the default and the AdaLoRA baseline")

    return study.study_args("beyond", __doc__, argv, add_arguments)


def render(result: dict) -> list[str]:
    """The table of a ``beyond`` result."""
    return study.render(result, TITLE)


def seeds3(result: str, only: str, *more: str, group: str = "full") -> Command:
    """A command of three seeds of some variants."""
    return Command(result, ("--only", only, "--seeds", "3", *more, "--name", result), group=group)


@experiment("beyond", section="## 8. Beyond the paper: layouts, modes, allocation",
            title="8-9. token layouts, state modes, allocation policies, step size, symmetry",
            parse_args=parse_args, render=render,
            commands=[Command("beyond"), seeds3("beyond_seeds", "reparam,sigmagrad,nocontext"),
                      seeds3("beyond_layouts_seeds", "patch,scale1", "--workers", "1"), seeds3("beyond_h128", "h128"),
                      Command("beyond_h128_lr3e-3", ("--only", "h128", "--lr", "3e-3", "--name", "beyond_h128_lr3e-3")),
                      Command("beyond_h128_mpnet", ("--model", "mpnet", "--only", "h128", "--seeds", "2",
                                                    "--name", "beyond_h128_mpnet")),
                      # The 128-wide default did best at 3e-3, the top of its two lrs (seed 0).
                      seeds3("beyond_h128_lr3e-3_seeds", "h128", "--lr", "3e-3"),
                      Command("beyond_h128_lr1e-2", ("--only", "h128", "--lr", "1e-2", "--adalora-lr", "3e-3",
                                                     "--name", "beyond_h128_lr1e-2"))])
def main(argv: list[str] | None = None) -> int:
    """Runs the chosen variants and writes ``results/<name>.*``."""
    args = parse_args(argv)
    only = {f"-{t}" for t in args.only.split(",") if t}
    unknown = only - {v.tag for v in VARIANTS}
    if unknown:
        raise SystemExit(f"beyond --only: unknown variant tags {sorted(t[1:] for t in unknown)}; "
                         f"known: {', '.join(v.tag[1:] for v in VARIANTS if v.tag)}")
    variants = [v for v in VARIANTS
                if not (args.no_rows and v.tag == "-rows") and (not only or not v.tag or v.tag in only)]
    study.run_study(args, variants, TITLE, render)
    return 0
