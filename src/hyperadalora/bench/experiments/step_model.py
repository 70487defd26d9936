"""The models, batches and step timing of the per-step cost experiments (``step_cost``, ``cost_per_step``).

A *variant* names what one training step trains on MiniLM:

* ``floor``: the frozen model's forward + backward with the gradient reaching the first layer
  (the embedding output requires grad) and only the classifier head trained.
* ``peft_lora``, ``peft_adalora``, ``peft_dora``: peft with ``task_type="SEQ_CLS"``.
* ``lora``, ``adalora``, ``dora``, ``dylora``: ours; ``hyper_<method>``: ours with a hypernetwork
  source; ``hyper_<method>_<body>_<layout>``: a given body (attention, mlp, cnn) and token layout
  (rank, rows, elements, patch). Hyper variants generate once per optimizer step
  (``generate="per_step"``).

A variant name may end in ``HyperConfig`` overrides, ``hyper_adalora+lam_hidden=64+checkpointing=True``,
read by the run config's override parser (:func:`hyperadalora.train.config.parse_override`).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch

from ...train.overrides import coerce, parse_override
from ...train.step import optimizer_step
from .common import MINILM_ENCODER_LINEARS

TOTAL_STEP = 100_000  # far beyond the run: AdaLoRA stays in its budget phase


def hyper_overrides(pairs: Sequence[str]) -> dict:
    """``["lam_hidden=64", "context=False"]`` -> ``{"lam_hidden": 64, "context": False}`` (``HyperConfig``'s types).

    Raises:
        ValueError: A pair that is not ``key=value`` or names no ``HyperConfig`` field.
    """
    from ...config import HyperConfig

    return coerce(HyperConfig, dict(parse_override(p) for p in pairs), "adapter.hyper.")


def parse_variant(variant: str) -> tuple[str, dict]:
    """``"hyper_adalora+lam_hidden=64+context=False"`` -> ``("hyper_adalora", {"lam_hidden": 64, "context": False})``.
    """
    name, *pairs = variant.split("+")
    return name, hyper_overrides(pairs)


def direct_twin(variant: str) -> str | None:
    """The direct method of a hyper variant (``hyper_adalora_mlp_rank+hidden=128`` -> ``adalora``), else ``None``."""
    return parse_variant(variant)[0].split("_")[1] if variant.startswith("hyper_") else None


def adapt(variant: str, model: torch.nn.Module, hyper_base: dict | None = None) -> torch.nn.Module:
    """``model`` (a copy of MiniLM) set up as ``variant`` trains it.

    Args:
        variant: The variant name (module docstring).
        model: The model to adapt (changed in place for ``floor``).
        hyper_base: ``HyperConfig`` fields of every hyper variant, under the variant's own overrides.
    """
    import hyperadalora as ha

    if variant == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.bert.embeddings.register_forward_hook(lambda mod, inp, out: out.requires_grad_())
        for p in model.classifier.parameters():
            p.requires_grad_(True)
        return model
    if variant.startswith("peft_"):
        import peft

        method = variant[len("peft_"):]
        common = dict(target_modules=MINILM_ENCODER_LINEARS, lora_alpha=16, lora_dropout=0.0, task_type="SEQ_CLS")
        if method == "adalora":
            cfg = peft.AdaLoraConfig(init_r=12, target_r=8, total_step=TOTAL_STEP, tinit=0, tfinal=0, deltaT=1,
                                     orth_reg_weight=0.5, **common)
        else:
            cfg = peft.LoraConfig(r=8, use_dora=(method == "dora"), **common)
        return peft.get_peft_model(model, cfg)
    name, overrides = parse_variant(variant)
    parts = name.split("_")
    hyper = parts[0] == "hyper"
    method = parts[1] if hyper else parts[0]
    defaults = ha.HyperConfig()
    hyper_cfg = ha.HyperConfig(**{"arch": parts[2] if len(parts) > 2 else defaults.arch,
                                  "tokens": parts[3] if len(parts) > 3 else defaults.tokens,
                                  "generate": "per_step", **(hyper_base or {}), **overrides})
    kw = dict(r=8)
    if method == "adalora":
        kw = dict(r=12, gamma=0.5, allocator=ha.AllocatorConfig(total_step=TOTAL_STEP, target_r=8, deltaT=1))
    return ha.wrap(model, ha.AdapterConfig(method=method, lora_alpha=16, target_modules=MINILM_ENCODER_LINEARS,
                                           modules_to_save=("classifier",), seed=0, hyper=hyper_cfg,
                                           source="hyper" if hyper else "direct", **kw))


class PeftAdaLoraSteps(torch.nn.Module):
    """peft's AdaLoRA model with the ``after_step`` hook :func:`optimizer_step` calls (its allocation)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch):
        return self.model(**batch)

    def after_step(self, step_index: int) -> None:
        self.model.base_model.update_and_allocate(step_index)


def build(variant: str, base: torch.nn.Module, hyper_base: dict | None = None) -> tuple[Callable, int, Callable]:
    """:func:`make_step` of a copy of ``base`` adapted as ``variant`` (:func:`adapt`)."""
    return make_step(adapt(variant, copy.deepcopy(base), hyper_base), variant)


def make_step(model: torch.nn.Module, variant: str) -> tuple[Callable, int, Callable]:
    """The step function of an adapted model, its trainable parameter count and its optimizer-state bytes.

    ``step(batch, accumulate=1, phases=None)`` runs one step of the library
    (:func:`~hyperadalora.train.step.optimizer_step`, no clipping) over ``accumulate``
    micro-batches; with ``phases`` (a dict) it appends the seconds of the generation
    (``generate``), of what runs between the last backward and the update (``hyper_backward``: the
    hypernetworks' backward and the gradient norm) and of the update (``optimizer``: AdamW, rank
    allocation, zeroing the gradients).
    """
    if variant == "peft_adalora":
        model = PeftAdaLoraSteps(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    counter = [0]
    source = getattr(model, "source", None)  # peft models have none

    def step(batch, accumulate: int = 1, phases: dict | None = None) -> None:
        marks = {"start": time.perf_counter()}
        if source is not None:
            source.prepare_training_forward()  # what the first training forward would do; timed on its own
        marks["generated"] = time.perf_counter()

        def micro_batches():
            yield from (batch for _ in range(accumulate))
            marks["backward_done"] = time.perf_counter()  # asked for more after the last backward

        optimizer_step(model, opt, micro_batches(), step_index=counter[0], max_grad_norm=0.0, grad_accum=accumulate,
                       on_update=lambda: marks.__setitem__("update", time.perf_counter()))
        if phases is not None:
            for key, (a, b) in (("generate", ("start", "generated")), ("hyper_backward", ("backward_done", "update")),
                                ("optimizer", ("update", None))):
                phases.setdefault(key, []).append((marks[b] if b else time.perf_counter()) - marks[a])
        counter[0] += 1

    def optimizer_state_bytes() -> int:
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))

    return step, sum(p.numel() for p in params), optimizer_state_bytes


def load_base() -> torch.nn.Module:
    """The packaged MiniLM with a 2-label classifier."""
    from ...models import load_model

    base, _ = load_model("minilm", num_labels=2)
    return base


def make_batch(batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of random token ids and labels (the same for every variant)."""
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 30000, (batch_size, seq_len), generator=g),
            "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch_size,), generator=g)}


def time_interleaved(steps: dict, batch, n: int, warmup: int, accumulate: int = 1,
                     progress: bool = False, phases: dict | None = None,
                     clock: Callable[[], float] = time.perf_counter,
                     alternate: bool = False) -> dict[str, list[float]]:
    """Seconds of ``n`` steps of each variant's step function, after ``warmup`` untimed steps each.

    The variants take turns step by step (round-robin), so machine noise hits them alike.
    With ``phases`` (a dict), ``phases[variant]`` collects the per-phase seconds of the timed steps.
    ``clock``: wall time by default; ``time.process_time`` counts the process's CPU time (with one
    thread: the work done, not the waiting on a shared machine). ``alternate``: every other round
    runs the variants in reverse order, so no variant always follows the same one (whose freed
    memory and evicted caches it would always inherit).
    """
    for step in steps.values():
        for _ in range(warmup):
            step(batch, accumulate)
    times = {v: [] for v in steps}
    for i in range(n):
        order = list(steps.items())
        for v, step in (order[::-1] if alternate and i % 2 else order):
            t0 = clock()
            if phases is None:
                step(batch, accumulate)
            else:
                step(batch, accumulate, phases.setdefault(v, {}))
            times[v].append(clock() - t0)
        if progress:
            print(f"step {i + 1}/{n}", file=sys.stderr, flush=True)
    return times


def memory_batch(args) -> tuple[int, int]:
    """(micro-batch size, micro-batches per step) of the memory runs: ``--memory-batch-size`` runs
    that many rows in one micro-batch (the peak of a real batch, not of its accumulated parts)."""
    size = getattr(args, "memory_batch_size", None)
    return (size, 1) if size else (args.batch_size, args.accumulate)


def measure_memory(variant: str, args, hyper_base: dict | None = None, module: str = "step_model") -> float:
    """Peak RSS growth (MiB) over a few steps of one variant, in a fresh subprocess.

    ``args`` has ``threads``, ``batch_size``, ``accumulate``, ``seq_len``, ``memory_steps`` (and
    optionally ``memory_batch_size``). The kernel's peak-RSS mark is reset
    (``/proc/self/clear_refs``) after the model is built, so loading and copying the checkpoint do
    not hide the training peak. ``module`` (of this package) supplies ``load_base``, ``build`` and
    ``make_batch`` (``plan_calibrate`` measures other models this way).
    """
    code = (
        "import json, torch; from hyperadalora.bench.experiments import %s as s;"
        "torch.set_num_threads(%d); base = s.load_base(); step, _, _ = s.build(%r, base, json.loads(%r));"
        "batch_size, accumulate = %d, %d; batch = s.make_batch(batch_size, %d); del base; import gc; gc.collect();"
        "rss = lambda key: int([l for l in open('/proc/self/status') if l.startswith(key)][0].split()[1]);"
        "before = rss('VmRSS:'); open('/proc/self/clear_refs', 'w').write('5');"
        "[step(batch, accumulate) for _ in range(%d)];"
        "print('PEAK', (rss('VmHWM:') - before) / 1024)"
    ) % (module, args.threads, variant, json.dumps(hyper_base or {}), *memory_batch(args), args.seq_len,
         args.memory_steps)
    # A fixed mmap threshold: glibc then maps every tensor above 64 KiB on its own and unmaps it when
    # freed, so the resident peak tracks the live tensors (glibc's default adaptive threshold lets
    # freed tensors linger in the heap, and the same variant measured 841-853 MiB from run to run).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float([ln for ln in out.stdout.splitlines() if ln.startswith("PEAK")][-1].split()[1])
