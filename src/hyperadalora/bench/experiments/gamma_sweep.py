"""Experiment 5 (paper Tables 5, 11): the orthogonality weight gamma for HyperAdaLoRA.

gamma in {0, 0.1, 0.15, 0.2} (``--gammas``) on SST-2 / MiniLM with the convergence protocol; the
table adds the regulariser value at the last step (how far P and Q are from orthogonal).
gamma 0.1 is the convergence run itself (shared cache). Writes ``results/gamma_sweep.*``.

Usage::

    hyperadalora bench gamma_sweep --data-dir ../shared/data [--gammas 0,0.1,0.15,0.2] [--seeds 1]
"""

from __future__ import annotations

import argparse

from ..registry import Command, experiment
from . import study
from .study import Variant

TITLE = "gamma sweep"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The study's options, with ``--gammas``."""
    return study.study_args("gamma_sweep", __doc__, argv,
                            lambda p: p.add_argument("--gammas", default="0,0.1,0.15,0.2"))


def fmt_last(value: float | None) -> str:
    """A logged value at the last step, or ``n/a``."""
    return f"{value:.4f}" if value is not None else "n/a"


def render(result: dict) -> list[str]:
    """The table of a gamma sweep: the regulariser at the end of each variant's first seed added."""
    return study.render(result, TITLE, ["regulariser at end (seed 0)"],
                        lambda rows: [fmt_last(rows[0]["final_regularizer"])])


@experiment("gamma_sweep", section="## 5. gamma sweep (Tables 5, 11)",
            title="5. orthogonality weight gamma in {0, 0.1, 0.15, 0.2}", parse_args=parse_args, render=render,
            commands=[Command("gamma_sweep", ("--seeds", "3", "--workers", "1"))])
def main(argv: list[str] | None = None) -> int:
    """Runs the gamma variants and writes ``results/<name>.*``."""
    args = parse_args(argv)
    gammas = [float(x) for x in args.gammas.split(",")]
    variants = [Variant(f"HyperAdaLoRA gamma {g:g}", overrides={"adapter.gamma": g},
                        tag="" if g == 0.1 else f"-gamma{g:g}") for g in gammas]
    study.run_study(args, variants, TITLE, render)
    return 0
