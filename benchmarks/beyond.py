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

    python benchmarks/beyond.py --data-dir ../shared/data [--no-rows] [--seeds 1]
"""

from __future__ import annotations

import sys

from variant_study import Variant, run_study, study_args

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


def main(argv: list[str] | None = None) -> int:
    def add_arguments(p):
        p.add_argument("--no-rows", action="store_true", help="skip the rows layout (about 4x the time of a direct step)")
        p.add_argument("--only", default="", help="run only these variants (their tags without the dash, e.g. "
                       "h128,lamh64) beside the default and the AdaLoRA baseline")

    args = study_args(__doc__, argv, "beyond", add_arguments)
    only = {f"-{t}" for t in args.only.split(",") if t}
    unknown = only - {v.tag for v in VARIANTS}
    if unknown:
        raise SystemExit(f"beyond.py --only: unknown variant tags {sorted(t[1:] for t in unknown)}; "
                         f"known: {', '.join(v.tag[1:] for v in VARIANTS if v.tag)}")
    variants = [v for v in VARIANTS if not (args.no_rows and v.tag == "-rows") and (not only or not v.tag or v.tag in only)]
    run_study(args, variants, "beyond the paper: layouts, modes, allocation, step size, symmetry")
    return 0


if __name__ == "__main__":
    sys.exit(main())
