"""``hyperadalora bench``: runs one of the paper-reproduction benchmarks of ``benchmarks/``.

The scripts live in the checkout's ``benchmarks/`` folder (they are not installed with the
package): it is found through ``$HYPERADALORA_BENCHMARKS``, else ``./benchmarks``, else the
checkout this package was installed from (``pip install -e``).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

BENCHMARKS_ENV = "HYPERADALORA_BENCHMARKS"
# name -> (script, what it measures); the experiment numbers are those of BENCHMARKS.md.
BENCHMARKS = {
    "convergence": ("convergence.py", "1. AdaLoRA vs HyperAdaLoRA convergence on RTE / WNLI / SST-2, MiniLM + MPNet"),
    "nlg": ("nlg.py", "2. SmolLM2 instruction tuning (Alpaca, GSM8K): time to target, BLEU-4 / ROUGE-1"),
    "generality": ("generality.py", "3. LoRA / DoRA / DyLoRA / AdaLoRA with and without hypernetwork, SmolLM2"),
    "cost_per_step": ("cost_per_step.py", "4. ms and memory per step across batch sizes, ours vs peft vs floor"),
    "gamma_sweep": ("gamma_sweep.py", "5. orthogonality weight gamma in {0, 0.1, 0.15, 0.2}"),
    "body_ablation": ("body_ablation.py", "6. hypernetwork body: attention vs MLP vs CNN"),
    "similarity": ("similarity.py", "7. cosine similarity of P, lam, Q: HyperAdaLoRA vs AdaLoRA"),
    "beyond": ("beyond.py", "8-9. token layouts, state modes, allocation policies, step size, symmetry"),
    "step_cost": ("step_cost.py", "per-step cost of every method / hypernetwork variant at one batch size"),
    "convergence_quick": ("convergence_quick.py", "the first one-seed layout / mode check (constant lr)"),
}


def benchmarks_dir() -> Path:
    """The folder holding the benchmark scripts.

    Raises:
        FileNotFoundError: If none is found (the message says how to point at one).
    """
    env = os.environ.get(BENCHMARKS_ENV)
    candidates = [Path(env).expanduser()] if env else []
    candidates += [Path.cwd() / "benchmarks"] + [p / "benchmarks" for p in Path(__file__).resolve().parents]
    for c in candidates:
        if (c / "convergence.py").is_file():
            return c
    raise FileNotFoundError("no benchmarks/ folder found: run from the hyperadalora checkout or set "
                            f"${BENCHMARKS_ENV} to its benchmarks/ folder")


def list_text() -> str:
    """One line per benchmark: name and what it measures."""
    width = max(len(n) for n in BENCHMARKS)
    return "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in BENCHMARKS.items())


def run_benchmark(name: str, argv: list[str]) -> int:
    """Runs ``benchmarks/<script>`` of ``name`` with ``argv`` as its command line; returns its exit status.

    Raises:
        ValueError: Unknown benchmark name (the message lists the known ones).
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    script = benchmarks_dir() / BENCHMARKS[name][0]
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script)] + list(argv)
    sys.path.insert(0, str(script.parent))  # the scripts import their neighbours (common, convergence, ...)
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:  # the scripts end with sys.exit(main())
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0
