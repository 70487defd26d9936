"""The one registry of the paper-reproduction benchmarks.

Each experiment registers itself once, with :func:`experiment`: its name (``hyperadalora bench
NAME``), the ``BENCHMARKS.md`` section its results belong to, what it measures, and the
:class:`Command` lines that wrote every committed ``benchmarks/results/<result>.json``. From that
one list come the ``hyperadalora bench`` listing, ``hyperadalora bench all`` (what ``make bench`` and
``make bench-quick`` run), ``hyperadalora bench commands`` (the same lines, printed) and
``hyperadalora bench render`` (each committed table rebuilt from its JSON by the experiment's
``render``, without running anything). Commands of the ``pending`` group are runs a verdict of
``BENCHMARKS.md`` still waits for (``hyperadalora bench all --group pending`` runs them); their
results are not committed yet, and a command moves to ``full`` when its result is.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .paths import results_dir

GROUPS = ("full", "quick", "pending")
#: Names ``hyperadalora bench`` reads as its own commands, not as experiments.
RESERVED = ("all", "commands", "render")


@dataclass(frozen=True)
class Command:
    """One registered invocation of an experiment and the result it writes.

    Attributes:
        result: The result's name: the command writes ``results/<result>.json`` and ``.md``.
        args: The experiment's options (``--data-dir`` is added by :func:`argv_of`).
        group: ``"full"`` (``make bench``), ``"quick"`` (``make bench-quick``) or ``"pending"`` (registered
            for a later session: ``hyperadalora bench all --group pending``; no committed result yet).
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


def registered() -> dict[str, Experiment]:
    """Every experiment, in registration order (importing the experiments registers them)."""
    from . import experiments  # noqa: F401  (each module registers itself on import)

    return EXPERIMENTS


def get(name: str) -> Experiment:
    """The experiment ``name``.

    Raises:
        ValueError: Unknown name (the message lists the known ones).
    """
    known = registered()
    if name not in known:
        raise ValueError(f"unknown benchmark {name!r}; choose one of: {', '.join([*known, *RESERVED])}")
    return known[name]


def commands(group: str | None = None) -> list[tuple[Experiment, Command]]:
    """Every registered command (of ``group`` if given), in registration order."""
    return [(e, c) for e in registered().values() for c in e.commands if group is None or c.group == group]


def command_for(result: str) -> tuple[Experiment, Command]:
    """The one registered command that writes ``results/<result>.json``.

    Raises:
        ValueError: No registered command writes it.
    """
    for e, c in commands():
        if c.result == result:
            return e, c
    raise ValueError(f"no registered benchmark command writes results/{result}.json")


def argv_of(exp: Experiment, cmd: Command, data_dir: str | None = None) -> list[str]:
    """The experiment's command line of ``cmd`` (with ``--data-dir`` where it takes one)."""
    return [*cmd.args] + (["--data-dir", data_dir] if exp.data and data_dir else [])


def list_text() -> str:
    """One line per experiment: name and what it measures."""
    known = registered()
    width = max(len(n) for n in known)
    return "\n".join(f"  {name:<{width}}  {e.title}" for name, e in known.items())


def commands_text(group: str | None = None, data_dir: str | None = None) -> str:
    """The registered commands as ``hyperadalora bench ...`` lines."""
    return "\n".join(shlex.join(["hyperadalora", "bench", e.name, *argv_of(e, c, data_dir)])
                     for e, c in commands(group))


def run(name: str, argv: Sequence[str]) -> int:
    """Runs experiment ``name`` with ``argv``; returns its exit status."""
    exp = get(name)
    try:
        code = exp.main(list(argv))
    except SystemExit as exc:  # argparse errors and --help
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return int(code or 0)


def run_all(group: str, data_dir: str | None, dry_run: bool = False) -> int:
    """Runs every registered command of ``group`` in order; stops at the first that fails."""
    for e, c in commands(group):
        argv = argv_of(e, c, data_dir)
        print(shlex.join(["hyperadalora", "bench", e.name, *argv]), file=sys.stderr, flush=True)
        code = 0 if dry_run else run(e.name, argv)
        if code:
            return code
    return 0


def render_result(result_name: str, result: dict) -> str:
    """The markdown table of a result JSON, as its registered experiment writes it."""
    exp, _ = command_for(result_name)
    if exp.render is None:
        raise ValueError(f"benchmark {exp.name} has no table to render")
    return "\n".join(exp.render(result)) + "\n"


def rebuild(names: Sequence[str], check: bool = False, folder: Path | None = None) -> int:
    """Rewrites ``results/<name>.md`` from ``results/<name>.json`` (every result: no names).

    Returns:
        0, or 1 with ``check`` when a table differs from its rendering (nothing is written).
    """
    folder = folder or results_dir()
    names = list(names) or sorted(p.stem for p in folder.glob("*.json"))
    stale = []
    for name in names:
        text = render_result(name, json.loads((folder / f"{name}.json").read_text()))
        md = folder / f"{name}.md"
        if md.is_file() and md.read_text() == text:
            continue
        stale.append(name)
        if not check:
            md.write_text(text)
    for name in stale:
        print(f"bench render: results/{name}.md {'differs from' if check else 'rewritten from'} its JSON",
              file=sys.stderr)
    return 1 if check and stale else 0


def bench_main(argv: Sequence[str]) -> int:
    """``hyperadalora bench [NAME | all | commands | render] [options]``; returns the exit status."""
    argv = list(argv)
    if not argv:
        print("benchmarks (hyperadalora bench NAME [options]; all, commands, render):\n" + list_text())
        return 0
    head, rest = argv[0], argv[1:]
    if head not in RESERVED:
        return run(head, rest)
    p = argparse.ArgumentParser(prog=f"hyperadalora bench {head}")
    if head == "render":
        p.add_argument("names", nargs="*", help="results to rebuild (default: every results/*.json)")
        p.add_argument("--check", action="store_true", help="exit 1 if a table differs; write nothing")
    else:
        p.add_argument("--group", choices=GROUPS, default="full" if head == "all" else None)
        p.add_argument("--data-dir", default=None)
        p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    try:
        args = p.parse_args(rest)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if head == "render":
        return rebuild(args.names, args.check)
    if head == "commands":
        print(commands_text(args.group, args.data_dir))
        return 0
    return run_all(args.group, args.data_dir, args.dry_run)
