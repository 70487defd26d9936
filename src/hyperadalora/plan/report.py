"""A text table of one plan, term by term (``hyperadalora plan``)."""

from __future__ import annotations

from .planner import GIB, Plan


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _tflop(x: float) -> str:
    return f"{x / 1e12:,.1f}"


def plan_table(plan: Plan) -> list[str]:
    """Markdown lines: parameters, memory per device by term, FLOPs per step by term."""
    pc = plan.shape.param_counts()
    s, a = plan.setup, plan.adapter
    hyper = sum(plan.hyper_params.values())
    lines = [f"{plan.shape.name}: {a.method} r={a.r} {a.source}"
             + (f" ({a.hyper.arch}, {a.hyper.tokens}, h={a.hyper.hidden})" if plan.hyper_params else "")
             + f", {plan.counts.modules} adapted linears; batch {s.batch} x {s.seq_len} on {s.gpus} device(s)"
             f" (micro-batch {s.micro} x {s.accumulation}), {s.precision}, "
             f"checkpointing {'on' if s.checkpointing else 'off'}",
             "", "| parameters | count |", "|---|---|",
             f"| base model | {pc['total']:,} |", f"| adapter factors | {plan.counts.factor_params:,} |",
             f"| adapter, other trained | {plan.counts.extra_params + plan.counts.head_params:,} |",
             f"| hypernetworks | {hyper:,} |", "", "| memory per device | GiB |", "|---|---|"]
    lines += [f"| {k} | {_gib(v)} |" for k, v in plan.memory.items() if v]
    lines += [f"| **total** | **{_gib(plan.memory_total)}** (fits {s.device_gib:g} GiB: "
              f"{'yes' if plan.fits else 'no'}) |", "", "| FLOPs per step (all devices) | TFLOP |", "|---|---|"]
    lines += [f"| {k} | {_tflop(v)} |" for k, v in plan.flops.items() if v]
    lines += [f"| **total** | **{_tflop(plan.flops_total)}** ({_tflop(plan.flops_per_device)} per device; "
              f"hypernetworks {100 * plan.hyper_share:.2f}%) |"]
    return lines
