"""Throughput and peak memory at scale: bf16 and 4-bit bases, our adapters against peft's.

    python benchmarks/gpu/scale_gpu.py --out benchmarks/results/scale_gpu.json      # one GPU, < 8 min
    python benchmarks/gpu/scale_gpu.py --smoke --out /tmp/scale_smoke.json         # CPU, tiny models

For each model (SmolLM2 causal LM, MPNet classifier), base (``bf16``: bf16 weights and autocast;
``4bit``: NF4 + double quantisation, bf16 compute) and variant (our LoRA, AdaLoRA and
HyperAdaLoRA; peft's LoRA and AdaLoRA), it trains ``--warmup`` + ``--steps`` AdamW steps on random
tokens (batch ``--batch`` x ``--seq``) and records tokens per second over the timed steps and the
peak GPU memory (``torch.cuda.max_memory_allocated``; ``null`` on the CPU). ``--smoke`` runs
the same code on tiny random Llama / BERT models for 2 steps, so the script is known to work
without a GPU. See docs/scale.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import hyperadalora as ha
from hyperadalora.quant import autocast, bnb_config, upcast_trainable_

VARIANTS = ("lora", "adalora", "hyperadalora", "peft-lora", "peft-adalora")
MODELS = {"smollm2": "causal-lm", "mpnet": "sequence-classification"}


def tiny_model(name: str, base: str, folder: Path):
    """A tiny random stand-in (smoke mode), saved and reloaded like a real checkpoint."""
    from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM)

    if name == "smollm2":
        cls, cfg = LlamaForCausalLM, LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2,
                                                  intermediate_size=96, tie_word_embeddings=False)
    else:
        cls, cfg = BertForSequenceClassification, BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4, intermediate_size=96)
    cls(cfg).save_pretrained(folder / name)
    kwargs = ({"quantization_config": bnb_config("4bit", torch.bfloat16), "device_map": "cpu"} if base == "4bit"
              else {"dtype": torch.bfloat16})
    return cls.from_pretrained(folder / name, **kwargs)


def load(name: str, base: str, smoke: bool, folder: Path):
    if smoke:
        return tiny_model(name, base, folder)
    from hyperadalora.models import load_model

    model, _ = load_model(name, task=MODELS[name], dtype=torch.bfloat16, quantize="4bit" if base == "4bit" else None)
    return model if base == "4bit" else model.to("cuda")


def adapt(model, variant: str, task: str, total_steps: int, r: int):
    """``(model, after_step)``: the adapted model and what it calls after each optimizer step."""
    saved = ["classifier"] if task == "sequence-classification" else []
    if variant.startswith("peft-"):
        import peft

        common = dict(target_modules="all-linear", modules_to_save=saved or None, lora_dropout=0.0,
                      task_type="SEQ_CLS" if saved else "CAUSAL_LM")
        if variant == "peft-adalora":
            cfg = peft.AdaLoraConfig(init_r=r, target_r=r // 2, total_step=total_steps, tinit=1, tfinal=1, **common)
            pm = peft.get_peft_model(model, cfg)
            return pm, lambda step: pm.base_model.update_and_allocate(step)
        pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, **common))
        return pm, lambda step: None
    method = "lora" if variant == "lora" else "adalora"
    alloc = ha.AllocatorConfig(total_step=total_steps, target_r=r // 2, tinit=1, tfinal=1) if method == "adalora" else None
    cfg = ha.AdapterConfig(method=method, source="hyper" if variant == "hyperadalora" else "direct", r=r,
                           lora_alpha=2 * r, target_modules="all-linear", modules_to_save=saved, allocator=alloc)
    am = ha.wrap(model, cfg)
    return am, am.after_step


def batch(task: str, size: int, seq: int, vocab: int, device) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (size, seq), device=device)
    labels = ids.clone() if task == "causal-lm" else torch.randint(0, 2, (size,), device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def measure(name: str, base: str, variant: str, args, folder: Path) -> dict:
    task = MODELS[name]
    total = args.warmup + args.steps
    model, after_step = adapt(load(name, base, args.smoke, folder), variant, task, total, args.r)
    upcast_trainable_(model)  # float32 master weights, for peft's models as for ours
    device = next(p for p in model.parameters() if p.requires_grad).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = batch(task, args.batch, args.seq, model.config.vocab_size if hasattr(model, "config") else 128, device)
    model.train()
    seconds = 0.0
    for step in range(total):
        if step == args.warmup and device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with autocast("bf16", device):
            loss = model(**data).loss
        loss.backward()
        if hasattr(model, "backward_hypernetworks"):
            model.backward_hypernetworks()
        opt.step()
        after_step(step)
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            seconds += time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"model": name, "base": base, "variant": variant, "tokens_per_s": args.batch * args.seq * args.steps / seconds,
            "peak_gib": peak, "final_loss": float(loss.detach()), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/scale_gpu.json")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 2 steps, CPU allowed")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--bases", default="bf16,4bit")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.seq, args.warmup, args.steps = min(args.batch, 4), min(args.seq, 16), 1, 2
    elif not torch.cuda.is_available():
        parser.error("no GPU: run with --smoke to check the script on the CPU")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for base in args.bases.split(","):
                for variant in args.variants.split(","):
                    rows.append(measure(name, base, variant, args, Path(tmp)))
                    print(json.dumps(rows[-1]), flush=True)
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else
           platform.processor() or "cpu", "smoke": args.smoke, "batch": args.batch, "seq": args.seq,
           "steps": args.steps, "warmup": args.warmup, "r": args.r}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
