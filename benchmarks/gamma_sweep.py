"""Experiment 5 (paper Tables 5, 11): the orthogonality weight gamma for HyperAdaLoRA.

gamma in {0, 0.1, 0.15, 0.2} (``--gammas``) on SST-2 / MiniLM with the convergence protocol; the
table adds the regulariser value at the last step (how far P and Q are from orthogonal).
gamma 0.1 is the convergence run itself (shared cache). Writes ``results/gamma_sweep.*``.

Usage::

    python benchmarks/gamma_sweep.py --data-dir ../shared/data [--gammas 0,0.1,0.15,0.2] [--seeds 1]
"""

from __future__ import annotations

import sys

from variant_study import Variant, run_study, study_args


def main(argv: list[str] | None = None) -> int:
    args = study_args(__doc__, argv, "gamma_sweep",
                      lambda p: p.add_argument("--gammas", default="0,0.1,0.15,0.2"))
    gammas = [float(x) for x in args.gammas.split(",")]
    variants = [Variant(f"HyperAdaLoRA gamma {g:g}", overrides={"adapter.gamma": g},
                        tag="" if g == 0.1 else f"-gamma{g:g}") for g in gammas]
    run_study(args, variants, "gamma sweep",
              extra_columns={"regulariser at end (seed 0)": lambda r: fmt_last(r["regularizer"])})
    return 0


def fmt_last(values: list) -> str:
    """The last value of a logged series, or ``n/a``."""
    return f"{values[-1]:.4f}" if values and values[-1] is not None else "n/a"


if __name__ == "__main__":
    sys.exit(main())
