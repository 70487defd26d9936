"""The paper-reproduction benchmarks (``hyperadalora bench``, ``make bench``, BENCHMARKS.md).

* :mod:`.registry`: the one list of experiments and of the commands that wrote every committed
  ``benchmarks/results/<name>.json``; each experiment's ``render`` rebuilds its table from the JSON.
* :mod:`.experiments`: one module per experiment (registered on import).
* :mod:`.paths`: where ``benchmarks/results/`` and ``BENCHMARKS.md`` are.
* :mod:`.curves`: pure functions on loss curves: smoothing, target losses, steps / seconds to
  a target, best learning rate, mean and spread over seeds.
* :mod:`.runner`: :class:`RunSpec` (one training run of the real loop), cached and run in
  parallel worker processes, so that a stopped benchmark resumes where it stopped.
* :mod:`.humaneval`: HumanEval pass@1 of kept runs' adapters, cached and spread over the same
  worker processes.
* :mod:`.report`: machine / version records, markdown tables, result files and plots.
"""

from .curves import best_lr, first_reach, mean_and_spread, smoothed_final
from .runner import RunSpec, run_specs

__all__ = ["RunSpec", "best_lr", "first_reach", "mean_and_spread", "run_specs", "smoothed_final"]
