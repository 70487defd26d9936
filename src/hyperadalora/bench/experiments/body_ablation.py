"""Experiment 6 (paper Fig. 3): the hypernetwork body, attention vs MLP vs CNN.

The three bodies at the paper's size (hidden 312) have similar parameter counts (one TinyBERT-sized
layer, h = 312; with the shared input / output projections, for MiniLM's 36 linears: attention
5.87 M, MLP 5.28 M, CNN 5.96 M, listed in the table). SST-2 / MiniLM with the convergence protocol; attention is the convergence
run itself. Writes ``results/body_ablation.*``.

Usage::

    hyperadalora bench body_ablation --data-dir ../shared/data [--bodies attention,mlp,cnn] [--seeds 1]
"""

from __future__ import annotations

import argparse

from ..experiment import Command, experiment
from . import convergence as conv
from . import study
from .common import PAPER_HIDDEN
from .study import Variant

TITLE = "hypernetwork body ablation"
ARCH_KEY = "adapter.hyper.arch"


def hyper_parameter_counts(archs: list[str]) -> dict[str, int]:
    """``{body: trainable hypernetwork parameters}`` of MiniLM's 36 adapted linears with each body."""
    import copy

    import torch

    import hyperadalora as ha
    from hyperadalora.models import load_model

    torch.manual_seed(0)
    base, _ = load_model("minilm", num_labels=2)
    counts = {}
    for arch in archs:
        cfg = ha.AdapterConfig(method="adalora", r=12, target_modules=conv.MODELS["minilm"]["adapter.target_modules"],
                               source="hyper", hyper=ha.HyperConfig(arch=arch, hidden=PAPER_HIDDEN),
                               allocator=ha.AllocatorConfig(total_step=100, target_r=8))
        model = ha.wrap(copy.deepcopy(base), cfg)
        counts[arch] = sum(p.numel() for p in model.hypernetwork_parameters() if p.requires_grad)
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The study's options, with ``--bodies``."""
    return study.study_args("body_ablation", __doc__, argv,
                            lambda p: p.add_argument("--bodies", default="attention,mlp,cnn"))


def render(result: dict) -> list[str]:
    """The table of a body ablation, with each body's hypernetwork parameter count.

    The counts are the result's ``config["hypernetwork_params"]``; the first result did not keep
    them, so they are counted again (a MiniLM is built per body: seconds, not a training run).
    """
    arch_of = {v["label"]: v["overrides"].get(ARCH_KEY) for v in result["config"]["variants"]}
    counts = (result["config"].get("hypernetwork_params")
              or hyper_parameter_counts([a for a in arch_of.values() if a is not None]))
    return study.render(result, TITLE, ["hypernetwork params"],
                        lambda rows: [f"{counts[arch_of[rows[0]['variant']]]:,}"
                                      if arch_of.get(rows[0]["variant"]) in counts else ""])


@experiment("body_ablation", section="## 6. Hypernetwork body ablation (Fig. 3)",
            title="6. hypernetwork body: attention vs MLP vs CNN", parse_args=parse_args, render=render,
            commands=[Command("body_ablation", ("--seeds", "3", "--workers", "1")),
                      # Every body ran at the attention body's best lr (1e-3): each body's own best lr (seed 0).
                      # The baseline pinned to the table's AdaLoRA lr: 'best' falls back to --lr when the
                      # convergence sweep's runs are not cached.
                      *(Command(f"body_ablation_lr{lr}", ("--lr", lr, "--adalora-lr", "3e-3",
                                                           "--name", f"body_ablation_lr{lr}"))
                        for lr in ("3e-4", "3e-3", "1e-2")),
                      # Every body's seed-0 best is 3e-3: three seeds there.
                      Command("body_ablation_lr3e-3_seeds", ("--lr", "3e-3", "--adalora-lr", "3e-3", "--seeds", "3",
                                                             "--name", "body_ablation_lr3e-3_seeds"))])
def main(argv: list[str] | None = None) -> int:
    """Runs the bodies and writes ``results/<name>.*``."""
    args = parse_args(argv)
    bodies = args.bodies.split(",")
    variants = [Variant(f"HyperAdaLoRA {b}", overrides={ARCH_KEY: b}, tag="" if b == "attention" else f"-{b}")
                for b in bodies]
    study.run_study(args, variants, TITLE, render,
                    config={"hypernetwork_params": hyper_parameter_counts(bodies)})
    return 0
