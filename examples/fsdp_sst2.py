"""Fully sharded (FSDP2) AdaLoRA on GLUE SST-2 with the packaged MiniLM: a plain torchrun loop.

Every process holds a shard of every parameter (``shard``: one FSDP group per BertLayer and the
root), trains on its share of every global batch, and the ranks prune the same singular values
(the allocator scores whole, gathered factors). Checkpoints hold the whole adapter and AdamW
state, so a run can continue on any number of processes::

    torchrun --nproc_per_node 2 examples/fsdp_sst2.py --data-dir ../shared/data
    torchrun --nproc_per_node 2 examples/fsdp_sst2.py --data-dir ../shared/data --source hyper
    torchrun --nproc_per_node 2 examples/fsdp_sst2.py --data-dir ../shared/data --resume runs/fsdp_sst2/step-10

On GPUs the same command uses NCCL (one process per GPU) and ``--precision bf16`` shards in
float32 and computes in bf16.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

import hyperadalora as ha
from hyperadalora.data.glue import read_glue
from hyperadalora.integrations.distributed import assert_in_sync, save_adapter, shard
from hyperadalora.integrations.fsdp import clip_grad_norm_, load_checkpoint, save_checkpoint
from hyperadalora.models import load_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder with sst2/train.tsv (else $HYPERADALORA_DATA_DIR)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch: rows per step, all processes (default 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--source", choices=["direct", "hyper"], default="direct")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--output-dir", default="runs/fsdp_sst2", help="checkpoints (step-<N>/) and adapter/")
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (default 10)")
    p.add_argument("--resume", default=None, help="a step-<N> checkpoint folder to continue from")
    return p.parse_args(argv)


def batches(tokenizer, data_dir, global_batch: int, rank: int, world: int):
    """Step ``k``'s rows for this rank: rows ``[k*B, (k+1)*B)`` of SST-2 train, every ``world``-th."""
    rows = read_glue("sst2", "train", data_dir)
    step = 0
    while True:
        chunk = [rows[(step * global_batch + i) % len(rows)] for i in range(global_batch)][rank::world]
        enc = tokenizer([r.text_a for r in chunk], padding="max_length", truncation=True, max_length=48,
                        return_tensors="pt")
        yield {**enc, "labels": torch.tensor([r.label for r in chunk])}
        step += 1


def main(argv=None) -> int:
    args = parse_args(argv)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    base, tokenizer = load_model("minilm", num_labels=2)
    steps = args.steps
    config = ha.AdapterConfig(
        method="adalora", source=args.source, r=8, lora_alpha=16, gamma=0.1, seed=0, target_modules="all-linear",
        modules_to_save=("classifier",), hyper=ha.HyperConfig(hidden=64),
        allocator=ha.AllocatorConfig(total_step=steps, target_r=4, tinit=max(1, steps // 4),
                                     tfinal=max(1, steps // 4), deltaT=max(1, steps // 20)))
    model = ha.wrap(base.to(device), config)  # the same seed on every rank: the same initial adapter
    shard(model, precision=args.precision)
    opt = torch.optim.AdamW(model.optimizer_param_groups(args.lr), lr=args.lr)
    start = 0
    if args.resume:
        load_checkpoint(model, opt, args.resume)
        start = model.steps_taken
    data = batches(tokenizer, args.data_dir, args.batch_size, rank, world)
    for _ in range(start):  # the data position: the same rows as an uninterrupted run from here on
        next(data)
    model.train()
    for step in range(start, steps):
        loss = model(**{k: v.to(device) for k, v in next(data).items()}).loss
        loss.backward()
        model.backward_hypernetworks()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.after_step(step)
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step + 1}/{steps} loss {float(mean) / world:.4f} rank {sum(model.ranks.values())}",
                  flush=True)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
            save_checkpoint(model, opt, Path(args.output_dir) / f"step-{step + 1}")
    assert_in_sync(model)
    save_adapter(model, Path(args.output_dir) / "adapter")
    if rank == 0:
        print(f"adapter: {args.output_dir}/adapter (ha.load_adapter(base_model, that folder), one process)")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
