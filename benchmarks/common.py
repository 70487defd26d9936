"""Shared helpers for the benchmark scripts: machine facts, versions, result files."""

from __future__ import annotations

import json
from pathlib import Path

from hyperadalora.bench.report import machine, versions  # noqa: F401  (re-exported for the scripts)

RESULTS = Path(__file__).resolve().parent / "results"
MINILM_ENCODER_LINEARS = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                          r"|intermediate\.dense|output\.dense)")


def write_results(name: str, result: dict, table: list[str]) -> Path:
    """Writes ``results/<name>.json`` and ``results/<name>.md``; returns the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(table) + "\n")
    return path
