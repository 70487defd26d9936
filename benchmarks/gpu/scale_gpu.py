"""Throughput and peak memory at scale: bf16 and 4-bit bases, our adapters against peft's.

    python benchmarks/gpu/scale_gpu.py --out benchmarks/results/scale_gpu.json      # one GPU, < 8 min
    python benchmarks/gpu/scale_gpu.py --smoke --out /tmp/scale_smoke.json         # CPU, tiny models

For each model (SmolLM2 causal LM, MPNet classifier), base (``bf16``: bf16 weights and autocast;
``4bit``: NF4 + double quantisation, bf16 compute) and variant (our LoRA, AdaLoRA and
HyperAdaLoRA; peft's LoRA and AdaLoRA), it trains ``--warmup`` + ``--steps`` AdamW steps on random
tokens (batch ``--batch`` x ``--seq``) and records tokens per second over the timed steps and the
peak memory above what was held before loading (GPU: ``torch.cuda.max_memory_allocated``; CPU:
the process's peak resident set). ``--smoke`` runs the same code on tiny random Llama / BERT
models for 2 steps, so the script is known to work without a GPU. ``--chunk-bases`` (default
``4bit_ckpt_chunk``: 4-bit, checkpointed, the causal-LM loss taken 256 positions at a time) adds
our variants on the causal LM only: peft has no chunked loss, and a classifier has no vocabulary
logits. The loading, adapting,
stepping and measuring is :mod:`hyperadalora.bench.scale`, shared with ``hyperadalora bench
scale_cpu`` (issue 23, item 6). See docs/scale.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
from pathlib import Path

import torch

from hyperadalora.bench.scale import MODELS, SETTINGS, VARIANTS, measure_config, random_batch


def measure(name: str, base: str, variant: str, args, folder: Path) -> dict:
    """One configuration: tokens per second over the timed steps, peak memory, final loss."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = 128 if args.smoke else None
    if vocab is None:
        from hyperadalora.models import resolve_model_path
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(str(resolve_model_path(name))).vocab_size
    data = [random_batch(MODELS[name], args.batch, args.seq, vocab, device)]
    row = measure_config(name, SETTINGS[base], variant, data, steps=args.steps, warmup=args.warmup,
                         total_steps=args.warmup + args.steps, r=args.r, device=device,
                         tiny_folder=folder if args.smoke else None)
    peak = row["peak_mib"] / 1024 if device.type == "cuda" else None  # a CPU process's RSS is not GPU memory
    return {"model": name, "base": base, "variant": variant,
            "tokens_per_s": args.batch * args.seq * args.steps / row["seconds"], "peak_gib": peak,
            "final_loss": row["final_loss"], "seconds": row["seconds"]}


def configurations(args) -> list[tuple[str, str, str]]:
    """``(model, base, variant)`` to measure: every combination, then our variants on the chunked bases
    (causal LMs only)."""
    models, variants = args.models.split(","), args.variants.split(",")
    plain = [(n, b, v) for n in models for b in args.bases.split(",") for v in variants]
    chunked = [(n, b, v) for n in models if MODELS[n] == "causal-lm" for b in args.chunk_bases.split(",") if b
               for v in variants if not v.startswith("peft-")]
    return plain + chunked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/scale_gpu.json")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 2 steps, CPU allowed")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--bases", default="bf16,4bit")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--chunk-bases", default="4bit_ckpt_chunk", help="bases with the chunked loss ('' : none)")
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
        for name, base, variant in configurations(args):
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
