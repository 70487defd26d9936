"""The judge: runs a HumanEval problem's tests against a function living in the sandbox.

Not imported by the package: :mod:`hyperadalora.eval.sandbox` runs this file's text, after the
text of :mod:`hyperadalora.eval.wire`, as ``python -I -c`` in a process of its own, outside the
sandbox, reading ``{"prompt", "test", "entry_point"}`` as JSON on stdin. ``sys.argv[1:3]`` are
the pipe file descriptors to the sandboxed program (requests out, replies in).

The tests are trusted (they come from the data set), so they run here, next to the prompt's own
helpers (``poly``, ``encode_cyclic``...); the entry point is a stand-in that sends each call's
arguments to the program and builds its return value from the plain data that comes back. The
program never sees the tests and cannot reach this process, so the only way to make ``check``
return is to answer every call correctly. Exit status: 0 ``check`` returned, 1 it raised or the
program stopped answering, 3 the judge itself could not start.
"""

import sys

SETUP_ERROR_EXIT = 3


def _remote_error(name, message):
    """An exception like the one the program raised (only builtin ``Exception`` types)."""
    import builtins

    kind = getattr(builtins, name, None) if isinstance(name, str) else None
    text = f"{message} [raised by the program under test]"
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(text)
        except BaseException:  # a constructor that wants other arguments (UnicodeDecodeError...)
            pass
    return RuntimeError(f"{name}: {text}")


class RemoteFunction:
    """Calls the program's entry point over the pipes; returns plain values only."""

    def __init__(self, name, requests, replies):
        self.__name__ = self.__qualname__ = name
        self._requests, self._replies = requests, replies

    def __call__(self, *args, **kwargs):
        try:
            request = ["call", encode(list(args)), encode(kwargs)]  # noqa: F821 (wire, run ahead)
        except NotPlainError as exc:  # noqa: F821
            raise TypeError(f"the tests pass a value the sandbox cannot send: {exc}") from None
        try:
            self._requests.write(dumps(request))  # noqa: F821
        except OSError:
            raise RuntimeError("the program under test stopped answering (it exited or closed its pipe)") from None
        reply = read_message(self._replies)  # noqa: F821
        if reply is None:
            raise RuntimeError("the program under test stopped answering (it exited or closed its pipe)")
        if reply[0] == "return" and len(reply) == 2:
            return decode(reply[1])  # noqa: F821
        if reply[0] == "raise" and len(reply) == 3:
            raise _remote_error(reply[1], reply[2])
        raise RuntimeError(f"the program under test sent a malformed reply {str(reply)[:200]}")


def _load(name, source, namespace):
    import linecache

    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    exec(compile(source, name, "exec"), namespace)


def _judge_main():
    import json
    import os
    import traceback

    try:
        spec = json.loads(sys.stdin.read())
        requests = os.fdopen(int(sys.argv[1]), "wb", buffering=0)
        replies = os.fdopen(int(sys.argv[2]), "rb")
        candidate = RemoteFunction(spec["entry_point"], requests, replies)
        namespace = {"__name__": "__main__"}
        _load("<prompt>", spec["prompt"], namespace)  # the prompt's helpers, as the data set wrote them
        namespace[spec["entry_point"]] = candidate
        _load("<test>", spec["test"], namespace)
        check = namespace["check"]
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(SETUP_ERROR_EXIT)
    try:
        ready = read_message(replies)  # noqa: F821
        if ready != ["ready"]:
            raise RuntimeError("the program under test ended before it was ready to be called "
                               f"(its output above says why){'' if ready is None else ': ' + str(ready)[:200]}")
        check(candidate)
    except BaseException as exc:
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # skip this frame
        traceback.print_exception(type(exc), exc, tb)
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    _judge_main()
