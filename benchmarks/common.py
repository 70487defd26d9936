"""Shared helpers for the benchmark scripts: machine facts, versions, result files."""

from __future__ import annotations

from pathlib import Path

from hyperadalora.bench.report import machine, versions, write_result  # noqa: F401  (re-exported for the scripts)

RESULTS = Path(__file__).resolve().parent / "results"
# The paper's hypernetwork width (TinyBERT's): the experiments that reproduce the paper pin it,
# since the library's default (HyperConfig.hidden) is the lighter 128.
PAPER_HIDDEN = 312
MINILM_ENCODER_LINEARS = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                          r"|intermediate\.dense|output\.dense)")


def write_results(name: str, result: dict, table: list[str]) -> Path:
    """Writes ``results/<name>.json`` and ``results/<name>.md``; returns the JSON path.

    ``result``'s own ``machine`` / ``versions`` entries are kept (see ``write_result``).
    """
    return write_result(RESULTS, name, result, table)
