"""What several experiments share: the paper's hypernetwork width, MiniLM's adapted linears, and
where a result is written."""

from __future__ import annotations

from pathlib import Path

from ..paths import results_dir
from ..report import write_result

# The paper's hypernetwork width (TinyBERT's): the experiments that reproduce the paper pin it,
# since the library's default (HyperConfig.hidden) is the lighter 128.
PAPER_HIDDEN = 312
MINILM_ENCODER_LINEARS = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                          r"|intermediate\.dense|output\.dense)")


def write_results(name: str, result: dict, lines: list[str]) -> Path:
    """Writes ``results/<name>.json`` and ``.md`` (``result``'s own ``machine`` / ``versions`` kept)."""
    return write_result(results_dir(), name, result, lines)


def result_path(name: str, suffix: str = ".png") -> Path:
    """``results/<name><suffix>`` (a plot beside the result)."""
    return results_dir() / f"{name}{suffix}"
