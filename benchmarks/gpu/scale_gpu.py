"""``hyperadalora bench scale_gpu`` from a checkout without an installed package (issue 23, item 7).

    python benchmarks/gpu/scale_gpu.py [options]     # = hyperadalora bench scale_gpu [options]
    python benchmarks/gpu/scale_gpu.py --smoke       # CPU check on tiny models

The benchmark itself is :mod:`hyperadalora.bench.experiments.scale_gpu`; ``run.sh`` beside this file
runs it on a lent GPU machine that has no network. See docs/scale.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from hyperadalora.bench import registry  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(registry.run("scale_gpu", sys.argv[1:]))
