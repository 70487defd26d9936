"""``python benchmarks/run.py NAME [options]`` is ``hyperadalora bench NAME [options]``.

The experiments live in :mod:`hyperadalora.bench.experiments` and are registered in
:mod:`hyperadalora.bench.registry`; ``results/`` holds what their registered commands wrote.
"""

import sys

from hyperadalora.bench.registry import bench_main

if __name__ == "__main__":
    sys.exit(bench_main(sys.argv[1:]))
