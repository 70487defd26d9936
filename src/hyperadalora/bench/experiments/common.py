"""What several experiments share: the paper's hypernetwork width, MiniLM's adapted linears, and
where a result is written."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
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


def comma_choices(parser: argparse.ArgumentParser, text: str, choices: Iterable[str], what: str,
                  allowed: Callable[[str], bool] | None = None) -> list[str]:
    """The non-empty items of a comma-separated option, each one of ``choices`` (or ``allowed``).

    Raises:
        SystemExit: Through ``parser.error``, naming the unknown items and the choices.
    """
    known = list(choices)
    items = [x for x in text.split(",") if x]
    unknown = [x for x in items if x not in known and not (allowed and allowed(x))]
    if unknown:
        parser.error(f"unknown {what} {unknown}; choose from {', '.join(known)}")
    return items
