"""Where the compacted AdaLoRA's extra step time goes (issue 23, item 4): phases and terms.

``compaction`` compares whole steps of the compacted AdaLoRA and of our plain LoRA at the same
per-module ranks. This experiment splits both steps, in one process, interleaved round by round
(the order reversed every other round), into

* ``forward`` (the model's forward; AdaLoRA's includes its orthogonality regulariser),
  ``backward`` and ``update`` (AdamW, ``after_step``, ``compact``, zeroing the gradients): the step
  of :func:`~hyperadalora.train.step.optimizer_step` without clipping, timed phase by phase;

and times, on the same compacted model and in the same rounds, the work AdaLoRA does that LoRA
does not, each term on its own (forward + backward):

* ``regularizer``: ``gamma * (||P^T P - I|| + ||Q Q^T - I||)`` over every adapted module;
* ``lam_products``: the effective factors ``Q * lam`` of every adapted module (LoRA uses its ``A`` as it is).

Each round is: a step of each variant, then each term ``--term-repeats`` times (their mean). The
model, settings and batches are ``compaction``'s (AdaLoRA 12 -> 8, gamma 0.5, final budget at
``--final``; MiniLM 16 x 128, SmolLM2 4 x 256, random tokens).

Usage::

    hyperadalora bench compaction_terms [--quick] [--models minilm,smollm2] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

import torch

from ..experiment import Command, experiment
from ..report import machine, markdown_table, versions
from .common import comma_choices, write_results
from .compaction import CLOCKS, MODELS, adalora, interval, lora_at, make_batch

VARIANTS = ("adalora_compact", "lora_same_ranks")
PHASES = ("forward", "backward", "update")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of :func:`main`."""
    p = argparse.ArgumentParser(prog="hyperadalora bench compaction_terms", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="MiniLM only, 2 rounds")
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--steps", type=int, default=8, help="interleaved rounds (timed steps per variant)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds after the final budget")
    p.add_argument("--final", type=int, default=1, help="the step at which the final budget is fixed")
    p.add_argument("--term-repeats", type=int, default=5, help="times each term runs per round (their mean)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                   help="the process's CPU time (default; with --threads 1: the work done), or wall time")
    p.add_argument("--name", default="compaction_terms")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.steps = "minilm", 2
    if args.steps < 2 or args.term_repeats < 1 or args.final < 1:
        p.error("--steps must be >= 2 (an interval needs two rounds), --term-repeats and --final >= 1")
    args.model_list = comma_choices(p, args.models, MODELS, "models")
    return args


def phased_step(model: torch.nn.Module, clock: Callable[[], float]) -> Callable[[dict, int], dict[str, float]]:
    """A training step of ``model`` (AdamW lr 1e-4) that returns the seconds of each phase."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step(batch: dict, index: int) -> dict[str, float]:
        t0 = clock()
        loss = model(**batch).loss
        t1 = clock()
        loss.backward()
        t2 = clock()
        optimizer.step()
        model.after_step(index)
        model.compact(optimizer)
        optimizer.zero_grad(set_to_none=True)
        return {"forward": t1 - t0, "backward": t2 - t1, "update": clock() - t2}

    return step


def regularizer_term(model: torch.nn.Module) -> None:
    """Forward + backward of the weighted orthogonality regulariser alone."""
    (model.adapter_config.gamma * model.regularizer()).backward()


def lam_products_term(model: torch.nn.Module) -> None:
    """Forward + backward of every adapted module's effective down factor ``Q * lam`` alone."""
    products = []
    for layer in model.layer_list:
        if layer.r == 0:  # compacted to rank 0: runs its base layer alone
            continue
        q_lam, _, _ = layer.method.effective_factors(layer, layer.get_factors())  # (r, d_in); scale: a float
        products.append(q_lam)
    torch.autograd.backward(products, [torch.ones_like(t) for t in products])


#: AdaLoRA's work beyond LoRA's, each timed alone: name -> forward + backward of it.
TERMS = {"regularizer": regularizer_term, "lam_products": lam_products_term}


def time_term(term: Callable[[torch.nn.Module], None], model: torch.nn.Module, repeats: int,
              clock: Callable[[], float]) -> float:
    """Mean seconds of ``repeats`` runs of ``term``; the gradients it leaves are cleared."""
    t0 = clock()
    for _ in range(repeats):
        term(model)
    seconds = (clock() - t0) / repeats
    model.zero_grad(set_to_none=True)
    return seconds


def build(name: str, args: argparse.Namespace) -> tuple[dict, dict, torch.nn.Module]:
    """The phased steps of both variants (the compacted one past its final budget), the batch, the compacted model."""
    from ...models import load_model

    task, targets, batch_size, seq_len = MODELS[name]
    base, _ = load_model(name, task=task, num_labels=2)
    batch = make_batch(task, batch_size, seq_len)
    clock = CLOCKS[args.clock]
    compact = adalora(base, targets, "final", args.final)
    steps = {"adalora_compact": phased_step(compact, clock)}
    for i in range(args.final + 1):  # through the final budget
        steps["adalora_compact"](batch, i)
    if not compact.allocator.compacted:
        raise RuntimeError("the final budget did not compact the model")
    steps["lora_same_ranks"] = phased_step(lora_at(base, targets, compact.ranks), clock)
    return steps, batch, compact


def measure_model(name: str, args: argparse.Namespace) -> dict:
    """The per-round phase and term seconds of one model."""
    steps, batch, compact = build(name, args)
    clock = CLOCKS[args.clock]
    phases = {v: {p: [] for p in PHASES} for v in VARIANTS}
    term_s = {t: [] for t in TERMS}
    first = args.final + 1
    for r in range(args.warmup + args.steps):
        order = VARIANTS[::-1] if r % 2 else VARIANTS
        split = {v: steps[v](batch, first + r) for v in order}
        seconds = {t: time_term(term, compact, args.term_repeats, clock) for t, term in TERMS.items()}
        if r < args.warmup:
            continue
        for v in VARIANTS:
            for p in PHASES:
                phases[v][p].append(split[v][p])
        for t in TERMS:
            term_s[t].append(seconds[t])
        print(f"{name}: round {r + 1 - args.warmup}/{args.steps}", file=sys.stderr, flush=True)
    ranks = compact.ranks
    return {"model": name, "batch": f"{MODELS[name][2]} x {MODELS[name][3]}", "modules": len(ranks),
            "adapted_modules": sum(r > 0 for r in ranks.values()), "kept_rank": sum(ranks.values()),
            "phases_s": phases, "terms_s": term_s}


def step_seconds(phases: dict[str, list[float]]) -> list[float]:
    """Per-round seconds of a whole step (the sum of its phases)."""
    return [sum(parts) for parts in zip(*(phases[p] for p in PHASES))]


def attribution_rows(m: dict) -> list[list[str]]:
    """Per phase and term: ms of each, the per-round difference, and its share of a LoRA step."""
    compact, lora = m["phases_s"]["adalora_compact"], m["phases_s"]["lora_same_ranks"]
    lora_step = statistics.mean(step_seconds(lora))
    rows = []
    for part, a, b in [*((p, compact[p], lora[p]) for p in PHASES),
                       ("step", step_seconds(compact), step_seconds(lora))]:
        diff = [x - y for x, y in zip(a, b)]
        rows.append([m["model"], part, f"{1e3 * statistics.median(a):.1f}", f"{1e3 * statistics.median(b):.1f}",
                     interval(diff, 1e3, 1), interval(diff, 100 / lora_step, 2),
                     interval([x / y for x, y in zip(a, b)])])
    for t in TERMS:
        rows.append([m["model"], f"{t} (alone)", f"{1e3 * statistics.median(m['terms_s'][t]):.1f}", "-", "-",
                     interval(m["terms_s"][t], 100 / lora_step, 2), "-"])
    return rows


def render(result: dict) -> list[str]:
    """The attribution table of a ``compaction_terms`` result."""
    c = result["config"]
    clock = "process CPU time" if c["clock"] == "cpu" else "wall time"
    head = (f"{c['steps']} interleaved rounds ({clock}, {c['threads']} thread(s), order reversed every other round) "
            f"after the final budget (AdaLoRA 12 -> 8, gamma 0.5); terms: mean of {c['term_repeats']} runs per "
            f"round on the compacted model; load average {c['load']} at the start "
            f"({result['machine']['device']}). Intervals: 95%, t, over the rounds.")
    rows = [row for m in result["models"] for row in attribution_rows(m)]
    return [head, "", *markdown_table(["model", "part", "compact median ms", "LoRA same ranks median ms",
                                       "compact - LoRA ms", "% of a LoRA step", "compact / LoRA"], rows)]


@experiment("compaction_terms",
            section="### Compacted AdaLoRA: where the extra time goes (issue 23, item 4)",
            title="the compacted AdaLoRA's step against LoRA at its ranks, phase by phase, and its own terms timed alone",
            parse_args=parse_args, render=render, data=False,
            commands=[Command("compaction_terms", ("--models", "minilm,smollm2", "--steps", "8")),
                      # The same on the idle machine (wait-quiet), two threads, wall time.
                      Command("compaction_terms_quiet", ("--models", "minilm,smollm2", "--steps", "8", "--threads",
                                                         "2", "--clock", "wall", "--name", "compaction_terms_quiet"))])
def main(argv: list[str] | None = None) -> int:
    """Measures every model and writes ``results/<name>.json`` / ``.md``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"machine": machine(), "versions": versions(), "models": [],
              "config": {"steps": args.steps, "warmup": args.warmup, "final": args.final,
                         "term_repeats": args.term_repeats, "threads": args.threads, "clock": args.clock,
                         "load": round(os.getloadavg()[0], 2), "init_r": 12, "target_r": 8, "gamma": 0.5,
                         "optimizer": "AdamW lr 1e-4",
                         "timing": "phases of round-robin interleaved steps (order reversed every other round)"}}
    for m in args.model_list:  # written after each model, so a long run that is stopped keeps what it measured
        result["models"].append(measure_model(m, args))
        lines = render(result)
        print(write_results(args.name, result, lines))
    print("\n".join(lines))
    return 0
