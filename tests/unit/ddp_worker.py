"""Data-parallel training of tiny_bert AdaLoRA, for tests/unit/test_ddp.py.

Run by ``torchrun --nproc_per_node 2 ddp_worker.py OUT_DIR`` (gloo, CPU): each rank trains on
its half of every global batch through DDP and writes ``OUT_DIR/rank<k>.json`` (losses, rank
pattern, state checksums, ``assert_in_sync`` outcome) and ``OUT_DIR/<config>_rank<k>.safetensors``
(masks, hypernetwork states, trainable parameters). ``run_config(name, world=1)`` is the
single-process reference on the whole global batch (the test calls it in-process).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hyperadalora as ha  # noqa: E402
from hyperadalora.integrations.distributed import assert_in_sync, state_checksums, wrap_ddp  # noqa: E402
from tiny_models import BERT_TARGETS, bert_batch, tiny_bert  # noqa: E402

STEPS, PER_RANK_BATCH, LR = 10, 4, 3e-3
SMALL_HYPER = dict(hidden=24, layers=1)
# Pruning from step 2 on (tinit=1), final budget at step 7, then fixed.
ALLOC = dict(total_step=STEPS, target_r=2, tinit=1, tfinal=3, deltaT=1)


def config(name: str) -> ha.AdapterConfig:
    source, hyper, policy = {
        "direct": ("direct", {}, "adalora"),
        "direct_sigma": ("direct", {}, "sigma-grad"),
        "hyper": ("hyper", {}, "adalora"),
        "hyper_per_step": ("hyper", {"generate": "per_step"}, "adalora"),
        "hyper_unsynced": ("hyper", {}, "adalora"),
    }[name]
    return ha.AdapterConfig(method="adalora", source=source, r=4, seed=7, gamma=0.1, target_modules=BERT_TARGETS,
                            modules_to_save=("classifier",), hyper=ha.HyperConfig(**{**SMALL_HYPER, **hyper}),
                            allocator=ha.AllocatorConfig(policy=policy, **ALLOC))


def global_batch(step: int, world: int) -> dict[str, torch.Tensor]:
    """The same global batch of ``2 * PER_RANK_BATCH`` rows for every world size."""
    return bert_batch(100 + step, batch=2 * PER_RANK_BATCH)


def run_config(name: str, world: int = 1, rank: int = 0) -> dict:
    """Trains one config; with ``world == 2`` this process is one DDP rank of two."""
    model = ha.wrap(tiny_bert(), config(name))  # same seeds on every rank
    if world > 1:
        if name == "hyper_unsynced":  # the negative control: plain DDP, no prepare_ddp
            forward = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
        else:
            forward = wrap_ddp(model)
    else:
        forward = model
    opt = torch.optim.AdamW(model.optimizer_param_groups(LR, 0.0), lr=LR)
    model.train()
    losses = []
    first_divergence, error = None, None
    for step in range(STEPS):
        batch = global_batch(step, world)
        if world > 1:
            batch = {k: v[rank * PER_RANK_BATCH:(rank + 1) * PER_RANK_BATCH] for k, v in batch.items()}
        loss = forward(**batch).loss
        loss.backward()
        model.backward_hypernetworks()  # per_step: the averaged dL/dF into the hypernetworks; else a no-op
        opt.step()
        model.after_step(step)
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
        if world > 1 and error is None:  # every step: the importance EMAs are reset at the final budget
            try:
                assert_in_sync(model)
            except RuntimeError as exc:
                first_divergence, error = step, str(exc)
    in_sync = error is None
    tensors = {f"state/{n}": layer.rank_mask.clone() for n, layer in model.adapted_layers.items()}
    if model.hyper is not None:
        tensors.update({f"source/{n}": b.clone() for n, b in model.hyper.named_buffers()})
    tensors.update({f"param/{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    return {"losses": losses, "rank_pattern": model.rank_pattern, "budget": model.allocator.budget,
            "checksums": state_checksums(model), "in_sync": in_sync, "error": error,
            "first_divergence": first_divergence, "tensors": tensors}


def run_trainer(name: str, world: int, rank: int, out_dir: str) -> dict:
    """The same run through ``AdaptedTrainer`` (``Trainer`` wraps the model in DDP itself)."""
    from transformers import TrainingArguments

    from hyperadalora.integrations.trainer import AdaptedTrainer

    class Recording(AdaptedTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    rows = []
    for step in range(STEPS):  # global step k = [rank 0's batch, rank 1's batch] of global_batch(k)
        b = global_batch(step, world)
        rows += [{k: v[i] for k, v in b.items()} for i in range(2 * PER_RANK_BATCH)]
    model = ha.wrap(tiny_bert(), config(name))
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, f"trainer_{name}"), max_steps=STEPS,
        per_device_train_batch_size=2 * PER_RANK_BATCH // world, learning_rate=LR, lr_scheduler_type="constant",
        weight_decay=0.0, optim="adamw_torch", max_grad_norm=0.0, train_sampling_strategy="sequential",
        # A classifier's loss is a mean over this rank's rows: do not rescale it by the number of processes.
        average_tokens_across_devices=False,
        report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1000, seed=0)
    trainer = Recording(model=model, args=args, train_dataset=rows)
    trainer.losses = []
    trainer.train()
    losses = torch.tensor(trainer.losses, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(losses)
        losses /= world
    error = None
    try:
        assert_in_sync(model)
    except RuntimeError as exc:
        error = str(exc)
    return {"losses": losses.tolist(), "rank_pattern": model.rank_pattern, "budget": model.allocator.budget,
            "checksums": state_checksums(model), "in_sync": error is None, "error": error,
            "first_divergence": None, "tensors": {}}


def main(out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=180))  # a crashed peer fails fast
    rank, world = dist.get_rank(), dist.get_world_size()
    from safetensors.torch import save_file

    report = {}
    for name in names:
        if name.startswith("trainer:"):
            result = run_trainer(name.split(":", 1)[1], world, rank, out_dir)
        else:
            result = run_config(name, world, rank)
        tensors = result.pop("tensors")
        if tensors:
            save_file({k: v.contiguous() for k, v in tensors.items()},
                      os.path.join(out_dir, f"{name}_rank{rank}.safetensors"))
        report[name] = result
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"world": world, "rank": rank, "results": report}, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else
         ["direct", "direct_sigma", "hyper", "hyper_per_step", "hyper_unsynced"])
