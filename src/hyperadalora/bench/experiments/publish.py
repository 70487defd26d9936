"""Copies each experiment's table (``results/<name>.md``) into ``BENCHMARKS.md``.

``BENCHMARKS.md`` holds the prose; a table sits between ``<!-- table:NAME -->`` and
``<!-- end:NAME -->`` and is replaced by the current ``results/NAME.md``, so that the published
figures are always those of the committed results. A missing result is left as it is and named.

Usage::

    hyperadalora bench publish [--check]   # --check: exit 1 if BENCHMARKS.md is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..paths import benchmarks_md, results_dir
from ..registry import experiment

MARKER = re.compile(r"(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- end:(?P=name) -->)", re.S)


def publish(text: str, results: Path) -> tuple[str, list[str]]:
    """``text`` with every marked table replaced; and the names whose result file is missing."""
    missing = []

    def fill(m: re.Match) -> str:
        path = results / f"{m['name']}.md"
        if not path.is_file():
            missing.append(m["name"])
            return m.group(0)
        return m.group(1) + path.read_text().rstrip("\n") + "\n" + m.group(4)

    return MARKER.sub(fill, text), missing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of :func:`main` (it writes no result: ``name`` is None)."""
    p = argparse.ArgumentParser(prog="hyperadalora bench publish", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    p.add_argument("--file", default=None, help="the file to fill (default: BENCHMARKS.md of the checkout)")
    args = p.parse_args(argv)
    args.name = None
    return args


@experiment("publish",
            section="# Benchmarks: the HyperAdaLoRA paper's experiments at CPU scale, side by side with peft",
            title="copies every results/<name>.md into BENCHMARKS.md between its table markers",
            parse_args=parse_args, data=False)
def main(argv: list[str] | None = None) -> int:
    """Fills (or with ``--check`` checks) the marked tables of ``BENCHMARKS.md``."""
    args = parse_args(argv)
    path = Path(args.file) if args.file else benchmarks_md()
    old = path.read_text()
    new, missing = publish(old, results_dir())
    for name in missing:
        print(f"publish: results/{name}.md not found; its table is left as it was", file=sys.stderr)
    if args.check:
        return 0 if new == old else 1
    path.write_text(new)
    return 0
