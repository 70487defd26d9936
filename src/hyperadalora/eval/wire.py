"""Plain values over a pipe: all that a sandboxed HumanEval program can hand to the tests.

The judge process (which runs a problem's tests) and the sandboxed program (which runs the
completion) exchange one JSON line per message. Values travel as *plain values* only: ``None``,
``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes`` and ``list`` / ``tuple`` / ``dict`` /
``set`` / ``frozenset`` of them, each of exactly that type (a subclass is refused). Whatever the
program does, the tests see values the judge built itself, so an object whose ``__eq__`` says
``True`` to everything cannot reach an ``assert``.

Messages from the program: ``["ready"]`` (the program ran to its end), ``["return", value]`` and
``["raise", exception type name, message]``. To the program: ``["call", args, kwargs]``.

Both child processes run this module's source text ahead of their own, so it imports nothing
but ``json`` and must stay valid as the head of a ``python -c`` script.
"""

from __future__ import annotations

import json

MAX_DEPTH = 100  # nesting of containers; deeper values are refused on both sides
MAX_LINE_BYTES = 64 * 1024 * 1024  # one message; a longer line counts as a broken pipe

_SEQUENCES = {list: "l", tuple: "t", set: "S", frozenset: "F"}
_FROM_TAG = {tag: kind for kind, tag in _SEQUENCES.items()}


class NotPlainError(TypeError):
    """A value that is not a plain value (see the module docstring)."""


def encode(value: object, depth: int = 0) -> object:
    """A plain value as JSON-ready data (tagged so that every type survives the trip).

    Raises:
        NotPlainError: On any other type, a subclass of a plain type, or nesting past ``MAX_DEPTH``.
    """
    if depth > MAX_DEPTH:
        raise NotPlainError(f"a value nested deeper than {MAX_DEPTH} levels")
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return ["i", format(value, "x")]  # hex: no limit on the number of digits
    if kind is float:
        return ["f", value]
    if kind is complex:
        return ["c", value.real, value.imag]
    if kind is bytes:
        return ["y", value.hex()]
    if kind in _SEQUENCES:
        return [_SEQUENCES[kind], [encode(v, depth + 1) for v in value]]
    if kind is dict:
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]]
    raise NotPlainError(
        f"a {kind.__module__}.{kind.__qualname__} object is not a plain value; only None, bool, int, "
        "float, complex, str, bytes and list/tuple/dict/set/frozenset of them (exact types) come back "
        "from the sandbox")


def decode(data: object, depth: int = 0) -> object:
    """The plain value that :func:`encode` turned into ``data``; every object is built here.

    Raises:
        NotPlainError: On anything :func:`encode` does not produce.
    """
    if depth > MAX_DEPTH:
        raise NotPlainError(f"a value nested deeper than {MAX_DEPTH} levels")
    if data is None or type(data) is bool or type(data) is str:
        return data
    if type(data) is not list or not data or type(data[0]) is not str:
        raise NotPlainError(f"not an encoded plain value: {type(data).__name__}")
    tag, rest = data[0], data[1:]
    if tag == "i" and len(rest) == 1 and type(rest[0]) is str:
        return int(rest[0], 16)
    if tag == "f" and len(rest) == 1 and type(rest[0]) in (int, float):
        return float(rest[0])
    if tag == "c" and len(rest) == 2 and all(type(x) in (int, float) for x in rest):
        return complex(float(rest[0]), float(rest[1]))
    if tag == "y" and len(rest) == 1 and type(rest[0]) is str:
        return bytes.fromhex(rest[0])
    if tag in _FROM_TAG and len(rest) == 1 and type(rest[0]) is list:
        return _FROM_TAG[tag](decode(v, depth + 1) for v in rest[0])
    if tag == "d" and len(rest) == 1 and type(rest[0]) is list:
        pairs = rest[0]
        if not all(type(p) is list and len(p) == 2 for p in pairs):
            raise NotPlainError("a dict entry is not a key-value pair")
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in pairs}
    raise NotPlainError(f"not an encoded plain value: tag {tag!r}")


def dumps(message: list) -> bytes:
    """One message as a JSON line (``message`` already holds encoded values)."""
    return (json.dumps(message, separators=(",", ":")) + "\n").encode("utf-8")


def read_message(stream) -> list | None:
    """The next message from a binary stream, or ``None`` at its end or on a broken line.

    Raises:
        NotPlainError: If the line is not a JSON list.
    """
    line = stream.readline(MAX_LINE_BYTES + 1)
    if not line.endswith(b"\n"):
        return None  # the end of the stream, or a line too long to be a message
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise NotPlainError(f"not a message: {exc}") from None
    if type(message) is not list or not message:
        raise NotPlainError("not a message")
    return message

