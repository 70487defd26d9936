"""Experiment 6 (paper Fig. 3): the hypernetwork body, attention vs MLP vs CNN.

The three bodies at the paper's size (hidden 312) have similar parameter counts (one TinyBERT-sized
layer, h = 312; with the shared input / output projections, for MiniLM's 36 linears: attention
5.87 M, MLP 5.28 M, CNN 5.96 M, listed in the table). SST-2 / MiniLM with the convergence protocol; attention is the convergence
run itself. Writes ``results/body_ablation.*``.

Usage::

    python benchmarks/body_ablation.py --data-dir ../shared/data [--bodies attention,mlp,cnn] [--seeds 1]
"""

from __future__ import annotations

import sys

from common import PAPER_HIDDEN
from variant_study import Variant, run_study, study_args


def hyper_parameter_count(arch: str) -> int:
    """Trainable hypernetwork parameters of MiniLM's 36 adapted linears with body ``arch``."""
    import torch

    import hyperadalora as ha
    from hyperadalora.models import load_model

    torch.manual_seed(0)
    base, _ = load_model("minilm", num_labels=2)
    import convergence as conv

    cfg = ha.AdapterConfig(method="adalora", r=12, target_modules=conv.MODELS["minilm"]["adapter.target_modules"],
                           source="hyper", hyper=ha.HyperConfig(arch=arch, hidden=PAPER_HIDDEN),
                           allocator=ha.AllocatorConfig(total_step=100, target_r=8))
    model = ha.wrap(base, cfg)
    return sum(p.numel() for p in model.hyper.parameters() if p.requires_grad)


def arch_params(result: dict, counts: dict[str, int]) -> str:
    """The hypernetwork parameter count of a cached run ('' for a direct run)."""
    adapter = result["config"]["adapter"]
    arch = (adapter.get("hyper") or {}).get("arch")
    return f"{counts[arch]:,}" if adapter.get("source") == "hyper" and arch in counts else ""


def main(argv: list[str] | None = None) -> int:
    args = study_args(__doc__, argv, "body_ablation",
                      lambda p: p.add_argument("--bodies", default="attention,mlp,cnn"))
    bodies = args.bodies.split(",")
    counts = {b: hyper_parameter_count(b) for b in bodies}
    variants = [Variant(f"HyperAdaLoRA {b}", overrides={"adapter.hyper.arch": b},
                        tag="" if b == "attention" else f"-{b}") for b in bodies]
    run_study(args, variants, "hypernetwork body ablation",
              extra_columns={"hypernetwork params": lambda r: arch_params(r, counts)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
