"""Fully sharded (FSDP2) training of tiny models, for tests/unit/test_fsdp.py.

Run by ``torchrun --nproc_per_node 2 fsdp_worker.py OUT_DIR NAMES`` (gloo, CPU): each rank
shards the model with :func:`hyperadalora.integrations.distributed.shard`, trains on its half
of every global batch, saves the whole adapter from rank 0 (``OUT_DIR/<name>_adapter``) and
writes ``OUT_DIR/rank<k>.json`` (losses, regulariser values, rank pattern, DyLoRA ranks, state
checksums, ``assert_in_sync`` outcome, what was sharded). ``run_config(name, world=1)`` is the
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

from tiny_models import (  # noqa: E402
    BERT_TARGETS,
    LLAMA_TARGETS,
    bert_batch,
    llama_batch,
    tiny_bert,
    tiny_llama,
)

import hyperadalora as ha  # noqa: E402
from hyperadalora.adapter_io import adapter_state_dict  # noqa: E402
from hyperadalora.integrations.distributed import (  # noqa: E402
    assert_in_sync,
    save_adapter,
    shard,
    state_checksums,
)
from hyperadalora.integrations.fsdp import clip_grad_norm_, load_checkpoint, save_checkpoint  # noqa: E402
from hyperadalora.sharding import is_sharded  # noqa: E402

STEPS, PER_RANK_BATCH, LR = 20, 4, 3e-3
MAX_GRAD_NORM = 0.3  # below the early norms (about 0.4 on tiny_bert): clipping is active
RESUME_AT = 9  # resume:<config> runs stop after this many steps (mid budget schedule) and continue
SMALL_HYPER = dict(hidden=24, layers=1)
# Pruning from step 2 on (tinit=1), final budget at step 16, then fixed.
ALLOC = dict(total_step=STEPS, target_r=2, tinit=1, tfinal=4, deltaT=2)
# name: (method, source, extra HyperConfig, allocation policy)
CONFIGS = {
    "adalora_direct": ("adalora", "direct", {}, "adalora"),
    "adalora_direct_sigma": ("adalora", "direct", {}, "sigma-grad"),
    "adalora_hyper": ("adalora", "hyper", {}, "adalora"),
    "adalora_hyper_per_step": ("adalora", "hyper", {"generate": "per_step"}, "adalora"),
    "lora_direct": ("lora", "direct", {}, None),
    "lora_hyper": ("lora", "hyper", {}, None),
    "dora_direct": ("dora", "direct", {}, None),
    "dora_hyper": ("dora", "hyper", {}, None),
    "dylora_direct": ("dylora", "direct", {}, None),
    "dylora_hyper": ("dylora", "hyper", {}, None),
    "sensitivity_lora": ("lora", "direct", {}, "sensitivity"),  # ranks chosen at wrap from calibration batches
}
QLORA = ("qlora_lora", "qlora_adalora")  # a 4-bit (NF4) tiny Llama base
BF16 = "adalora_direct_bf16"  # adalora_direct sharded with precision="bf16" (MixedPrecisionPolicy)


def config(name: str) -> ha.AdapterConfig:
    if name in QLORA:
        method = name.split("_")[1]
        alloc = {"allocator": ha.AllocatorConfig(**ALLOC)} if method == "adalora" else {}
        return ha.AdapterConfig(method=method, r=4, seed=7, gamma=0.1, target_modules=LLAMA_TARGETS, **alloc)
    method, source, hyper, policy = CONFIGS[name.removesuffix("_bf16")]
    settings = {} if policy == "sensitivity" else ALLOC
    alloc = {"allocator": ha.AllocatorConfig(policy=policy, **settings)} if policy else {}
    return ha.AdapterConfig(method=method, source=source, r=4, seed=7, gamma=0.1, target_modules=BERT_TARGETS,
                            modules_to_save=("classifier",), hyper=ha.HyperConfig(**{**SMALL_HYPER, **hyper}),
                            **alloc)


def save_llama(out_dir: str) -> Path:
    """The float32 tiny Llama the QLORA runs quantise, saved once under ``out_dir``."""
    folder = Path(out_dir) / "llama"
    if not (folder / "model.safetensors").is_file():
        tiny_llama().save_pretrained(folder)
    return folder


def base_model(name: str, out_dir: str):
    """tiny_bert, or for QLORA the tiny Llama reloaded in 4 bits (NF4) from ``out_dir``."""
    if name not in QLORA:
        return tiny_bert()
    from transformers import LlamaForCausalLM, logging

    from hyperadalora.quant import bnb_config

    logging.set_verbosity_error()
    folder = Path(out_dir) / "llama"
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=bnb_config("4bit"), device_map="cpu")


def global_batch(name: str, step: int) -> dict[str, torch.Tensor]:
    """The same global batch of ``2 * PER_RANK_BATCH`` rows for every world size (equal lengths,
    so the mean of the ranks' mean losses is the global mean)."""
    if name in QLORA:
        return llama_batch(100 + step, batch=2 * PER_RANK_BATCH)
    return bert_batch(100 + step, batch=2 * PER_RANK_BATCH)


def build(name: str, out_dir: str, world: int) -> tuple[ha.AdaptedModel, torch.optim.Optimizer, dict]:
    """The wrapped (and, with ``world > 1``, sharded) model, its AdamW, and a dict a forward
    pre-hook fills with the dtypes of a layer's factors and base weight as FSDP gathered them."""
    # Same seeds on every rank; Sensitivity-LoRA: the same calibration batches on every rank too.
    model = ha.wrap(base_model(name, out_dir), config(name), calibration=[bert_batch(200 + i) for i in range(3)])
    seen: dict[str, str] = {}
    first = next(iter(model.adapted_layers.values()))
    first.register_forward_pre_hook(lambda m, _: seen.update(
        {k: str(t.dtype) for k, t in m.get_factors().items()}, base=str(m.base_layer.weight.dtype)))
    if world > 1:
        shard(model, precision="bf16" if name == BF16 else "fp32")
    model.train()
    return model, torch.optim.AdamW(model.optimizer_param_groups(LR, 0.0), lr=LR), seen


def train(model, opt, name: str, steps: range, world: int, rank: int, log: dict) -> None:
    """The training contract for ``steps``, appending to ``log``'s lists (and its first error)."""
    for step in steps:
        batch = global_batch(name, step)
        if world > 1:
            batch = {k: v[rank * PER_RANK_BATCH:(rank + 1) * PER_RANK_BATCH] for k, v in batch.items()}
        log["dylora"].append(model.dylora_rank)
        loss = model(**batch).loss
        loss.backward()
        model.backward_hypernetworks()  # per_step: the averaged dL/dF into the hypernetworks; else a no-op
        log["grad_norms"].append(float(clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)))
        opt.step()
        model.after_step(step)
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        log["losses"].append(float(value))
        log["regs"].append(model.last_regularizer)
        if world > 1 and log["error"] is None:
            try:
                assert_in_sync(model)
            except RuntimeError as exc:
                log["error"] = f"step {step}: {exc}"


def run_config(name: str, out_dir: str, world: int = 1, rank: int = 0) -> dict:
    """Trains one config; with ``world == 2`` this process is one FSDP2 rank of two.

    ``resume:<config>`` stops after ``RESUME_AT`` steps, saves a checkpoint
    (``save_checkpoint``), drops the model and optimizer, builds and shards new ones, restores
    the checkpoint (``load_checkpoint``) and trains the remaining steps.
    """
    resume = name.startswith("resume:")
    name = name.removeprefix("resume:")
    model, opt, seen = build(name, out_dir, world)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    sharded = sorted(n for n, p in model.named_parameters() if p.requires_grad and is_sharded(p))
    log = {"losses": [], "regs": [], "dylora": [], "grad_norms": [], "error": None}
    if resume:
        train(model, opt, name, range(RESUME_AT), world, rank, log)
        folder = os.path.join(out_dir, f"resume_{name}_checkpoint")
        save_checkpoint(model, opt, folder)
        del model, opt  # as if the run had been killed here
        model, opt, seen = build(name, out_dir, world)
        load_checkpoint(model, opt, folder)
    train(model, opt, name, range(RESUME_AT if resume else 0, STEPS), world, rank, log)
    tensors = {}
    if world > 1:
        save_adapter(model, os.path.join(out_dir, f"{'resume_' if resume else ''}{name}_adapter"))
    else:
        tensors = {k: t.detach().clone() for k, t in adapter_state_dict(model).items()}
    return {**log, "rank_pattern": model.rank_pattern, "budget": model.allocator.budget,
            "checksums": state_checksums(model), "in_sync": log["error"] is None, "sharded": sharded,
            "trainable": trainable, "dtypes_in_forward": seen,
            "quantized": sum(type(m).__name__ == "Linear4bit" for m in model.modules()), "tensors": tensors}


def main(out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=180))  # a crashed peer fails fast
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0 and any(n in QLORA for n in names):
        save_llama(out_dir)
    dist.barrier()
    report = {}
    for name in names:
        result = run_config(name, out_dir, world, rank)
        result.pop("tensors")
        report[name] = result
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"world": world, "rank": rank, "results": report}, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
