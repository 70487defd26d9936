"""Where the benchmark results live: the checkout's ``benchmarks/results/`` folder.

The results are not installed with the package: the folder is found through
``$HYPERADALORA_BENCHMARKS`` (a ``benchmarks/`` folder), else ``./benchmarks``, else the checkout
this package was installed from (``pip install -e``).
"""

from __future__ import annotations

import os
from pathlib import Path

BENCHMARKS_ENV = "HYPERADALORA_BENCHMARKS"


def benchmarks_dir() -> Path:
    """The ``benchmarks/`` folder (its ``results/`` holds the committed result files).

    Raises:
        FileNotFoundError: If none is found (the message says how to point at one).
    """
    env = os.environ.get(BENCHMARKS_ENV)
    if env:
        return Path(env).expanduser()
    candidates = [Path.cwd() / "benchmarks"] + [p / "benchmarks" for p in Path(__file__).resolve().parents]
    for c in candidates:
        if (c / "results").is_dir():
            return c
    raise FileNotFoundError("no benchmarks/ folder found: run from the hyperadalora checkout or set "
                            f"${BENCHMARKS_ENV} to its benchmarks/ folder")


def results_dir() -> Path:
    """``benchmarks/results/``: ``<name>.json`` / ``.md`` / ``.png`` of every result."""
    return benchmarks_dir() / "results"


def benchmarks_md() -> Path:
    """``BENCHMARKS.md`` beside the ``benchmarks/`` folder (the prose and the published tables)."""
    return benchmarks_dir().parent / "BENCHMARKS.md"
