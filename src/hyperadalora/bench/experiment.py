"""What an experiment is: :class:`Command`, :class:`Experiment` and the :func:`experiment` decorator.

A leaf module: the experiments import it to register themselves, and :mod:`.registry` (the
listing, ``all``, ``commands``, ``render``) imports the experiments, so neither imports the other
both ways.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

GROUPS = ("full", "quick", "pending", "gpu")
#: Names ``hyperadalora bench`` reads as its own commands, not as experiments.
RESERVED = ("all", "commands", "render")


@dataclass(frozen=True)
class Command:
    """One registered invocation of an experiment and the result it writes.

    Attributes:
        result: The result's name: the command writes ``results/<result>.json`` and ``.md``.
        args: The experiment's options (``--data-dir`` is added by :func:`argv_of`).
        group: ``"full"`` (``make bench``), ``"quick"`` (``make bench-quick``), ``"pending"`` (registered
            for a later session: ``hyperadalora bench all --group pending``; no committed result yet) or
            ``"gpu"`` (needs a GPU: ``benchmarks/gpu/run.sh``, never ``make bench``).
    """

    result: str
    args: tuple[str, ...] = ()
    group: str = "full"

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"Command.group {self.group!r}: choose one of {GROUPS}")
        if not self.result or any(ch in self.result for ch in "/\\ "):
            raise ValueError(f"Command.result {self.result!r} must be a plain file name")
        object.__setattr__(self, "args", tuple(self.args))


@dataclass(frozen=True)
class Experiment:
    """A registered experiment (see :func:`experiment` for the fields)."""

    name: str
    section: str
    title: str
    main: Callable[[list[str] | None], int | None]
    parse_args: Callable[[list[str] | None], argparse.Namespace]
    render: Callable[[dict], list[str]] | None
    commands: tuple[Command, ...]
    data: bool


EXPERIMENTS: dict[str, Experiment] = {}


def experiment(name: str, *, section: str, title: str, parse_args: Callable, render: Callable | None = None,
               commands: Sequence[Command] = (), data: bool = True) -> Callable:
    """Registers the decorated ``main(argv) -> exit status`` as the experiment ``name``.

    Args:
        name: ``hyperadalora bench NAME``.
        section: The ``BENCHMARKS.md`` heading (the whole line) its results are published under.
        title: What it measures (one line of the listing).
        parse_args: ``parse_args(argv)`` of ``main``; its ``name`` is the result name it writes.
        render: ``render(result dict) -> markdown lines``: the table ``main`` writes, as a pure
            function of the result JSON (``None``: the experiment writes no table).
        commands: The registered invocations, one per committed result.
        data: Whether it takes ``--data-dir``.

    Raises:
        ValueError: A name registered twice or reserved.
    """
    if name in EXPERIMENTS or name in RESERVED:
        raise ValueError(f"benchmark {name!r} is registered already (or reserved)")

    def register(main: Callable) -> Callable:
        EXPERIMENTS[name] = Experiment(name, section, title, main, parse_args, render, tuple(commands), data)
        return main

    return register
