"""The process-level fences of the sandbox: namespaces, resource limits, a bare environment.

:func:`start` launches a command so that it and everything it starts can be killed as one
(:func:`stop`), cannot signal or see any process outside, and has no network. How depends on
what this machine allows, probed once (:func:`containment`):

* ``"namespaces"`` — util-linux ``unshare --user --pid --net --mount --mount-proc --fork
  --kill-child``: the command runs as PID 1 of a new PID namespace, in new user, network and
  mount namespaces, with a ``/proc`` that shows only its own processes. When PID 1 ends, the
  kernel kills every process left in the namespace (``setsid``, double forks and re-parenting
  do not get out), and :func:`stop` waits for that. The program has no capabilities outside its
  user namespace, and no process outside has a PID it can name. Where the kernel allows it
  (``sealed``), the child starts as root of its user namespace (``--map-root-user``) and, before
  any untrusted code, seals its file system and drops every capability (``sandbox_seal.py``,
  configured by :func:`seal_config`).
* ``"process-group"`` — no ``unshare`` command, or the kernel refuses the namespaces: a new
  session whose process group is killed, plus a user + network namespace through ``unshare(2)``
  where allowed. A process that calls ``setsid()`` escapes the kill here, and the program can
  signal other processes of the same user; see the sandbox's module docstring.
"""

from __future__ import annotations

import json
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

_MIB = 1024 * 1024
MAX_FILE_BYTES = 16 * _MIB  # RLIMIT_FSIZE: any one file, captured output included
_MAX_OPEN_FILES = 256
_EXTRA_TASKS = 64  # RLIMIT_NPROC headroom above the user's current task count
_UNSHARE_OPTIONS = ("--user", "--pid", "--net", "--mount", "--mount-proc", "--fork", "--kill-child")
_MAP_ROOT = "--map-root-user"  # root of its user namespace until sandbox_seal drops every capability
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_TREE_DEATH_WAIT_S = 10.0  # how long stop() waits for the kernel to empty a PID namespace


@dataclass(frozen=True)
class Containment:
    """How :func:`start` contains a command on this machine.

    Attributes:
        mode: ``"namespaces"`` or ``"process-group"`` (see the module docstring).
        prefix: The command put in front of the contained one (the ``unshare`` invocation).
        unshare_flags: ``unshare(2)`` flags applied before ``exec`` (``"process-group"`` mode).
        sealed: The child can seal its file system (:func:`seal_config`; ``"namespaces"`` only).
    """

    mode: str
    prefix: tuple[str, ...]
    unshare_flags: int
    sealed: bool = False

    def __post_init__(self):
        if self.mode not in ("namespaces", "process-group"):
            raise ValueError(f"unknown containment mode {self.mode!r}")
        if self.sealed and self.mode != "namespaces":
            raise ValueError("only the namespaces mode can seal the file system")


@cache
def script(*names: str) -> str:
    """The source a child runs with ``python -c``: these files of this package, in order."""
    here = Path(__file__).resolve().parent
    return "\n\n".join((here / name).read_text(encoding="utf-8") for name in names)


def _python_dirs() -> list[str]:
    """Where this Python lives: what a sealed child must still see."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            os.path.dirname(os.path.realpath(sys.executable))}
    return sorted(os.path.realpath(d) for d in dirs if d)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def seal_config(workdir: str) -> dict | None:
    """What a sealed child hides and keeps (see ``sandbox_seal.py``), or ``None`` when not sealed.

    Hidden: the home directories (``~``, ``/root``, ``/home``) except one holding ``workdir``
    or lying inside the Python installation; kept under them: the Python installation.
    """
    if not containment().sealed:
        return None
    workdir, keep = os.path.realpath(workdir), _python_dirs()
    hide: list[str] = []
    for home in sorted({os.path.realpath(os.path.expanduser("~")), "/root", "/home"}):
        if (home != "/" and os.path.isdir(home) and not _inside(workdir, home)
                and not any(_inside(home, k) for k in keep) and not any(_inside(home, h) for h in hide)):
            hide.append(home)
    return {"workdir": workdir, "hide": hide, "keep": keep}


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
_probe_lock = threading.Lock()
_probed: Containment | None = None


def limit_child(limits: list[tuple[int, int, int]], unshare_flags: int = 0) -> None:
    """``preexec_fn``: runs in the forked child before ``exec``. No imports, little work."""
    if unshare_flags and _UNSHARE(unshare_flags) != 0:
        raise OSError("unshare failed in the sandbox child")
    for which, soft, hard in limits:
        resource.setrlimit(which, (soft, hard))


def _runs(command: list[str], preexec=None, check: str = "pass", args: tuple[str, ...] = (), cwd=None) -> bool:
    try:
        probe = subprocess.run(
            [*command, sys.executable, "-I", "-c", check, *args], stdin=subprocess.DEVNULL, cwd=cwd,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, preexec_fn=preexec)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


_SEAL_CHECK = """
import json, os, sys
seal(json.loads(sys.argv[1]))
assert os.getpid() == 1 and os.getppid() == 0
open("inside", "w").write("ok")  # the working directory stays writable
for path in ("/", os.path.dirname(os.getcwd())):  # and nothing else is
    try:
        open(os.path.join(path, "hyperadalora-seal-probe"), "w")
    except OSError:
        continue
    raise SystemExit(f"{path} is writable after sealing")
"""


def _seals(prefix: tuple[str, ...]) -> bool:
    """Whether a child started with ``prefix`` can seal its file system and drop its capabilities."""
    workdir = tempfile.mkdtemp(prefix="hyperadalora-sandbox-probe-")
    try:
        config = {"workdir": workdir, "hide": [], "keep": _python_dirs()}
        return _runs(list(prefix), check=script("sandbox_seal.py") + _SEAL_CHECK, args=(json.dumps(config),),
                     cwd=workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _probe() -> Containment:
    unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin") if sys.platform.startswith("linux") else None
    if unshare:
        sealing = (unshare, _MAP_ROOT, *_UNSHARE_OPTIONS, "--")
        if _seals(sealing):
            return Containment("namespaces", sealing, 0, sealed=True)
        prefix = (unshare, *_UNSHARE_OPTIONS, "--")
        if _runs(list(prefix), check="import os; assert os.getpid() == 1 and os.getppid() == 0"):
            return Containment("namespaces", prefix, 0)
    for flags in (_CLONE_NEWUSER | _CLONE_NEWNET, _CLONE_NEWNET) if _UNSHARE else ():
        if _runs([], preexec=partial(limit_child, [], flags)):
            return Containment("process-group", (), flags)
    return Containment("process-group", (), 0)


def containment() -> Containment:
    """The containment this machine allows, probed on first use (a few child processes)."""
    global _probed
    with _probe_lock:
        if _probed is None:
            _probed = _probe()
        return _probed


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


def rlimits(timeout_s: float, memory_mb: int) -> list[tuple[int, int, int]]:
    """``(resource, soft, hard)`` limits for a child allowed ``timeout_s`` seconds and ``memory_mb`` MiB."""
    cpu = math.ceil(timeout_s) + 1
    wanted = [
        (resource.RLIMIT_AS, memory_mb * _MIB, memory_mb * _MIB),
        # soft < hard: SIGXCPU at `cpu` seconds, SIGKILL one second later
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_FSIZE, MAX_FILE_BYTES, MAX_FILE_BYTES),
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


def child_env(workdir: str) -> dict[str, str]:
    """A minimal environment built from scratch: no proxies, tokens or ``PYTHON*`` settings leak in."""
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


def start(argv: list[str], *, cwd: str, env: dict[str, str], stdout, limits: list[tuple[int, int, int]],
          pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Starts ``argv`` contained (see the module docstring); stdin is ``/dev/null``.

    Args:
        argv: The command.
        cwd: Its working directory.
        env: Its whole environment.
        stdout: Where its stdout and stderr go (a file object).
        limits: Resource limits from :func:`rlimits`.
        pass_fds: File descriptors it inherits.

    Returns:
        The process; end it with :func:`wait_then_stop` or :func:`stop`.

    Raises:
        OSError, subprocess.SubprocessError: If it could not be started.
    """
    mode = containment()
    return subprocess.Popen(
        [*mode.prefix, *argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
        stderr=subprocess.STDOUT, close_fds=True, pass_fds=pass_fds, start_new_session=True,
        preexec_fn=partial(limit_child, limits, mode.unshare_flags))


def _namespace_init(pid: int) -> int | None:
    """A pidfd of the PID namespace's first process, the only child of ``unshare`` (or ``None``)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            children = f.read().split()
        return os.pidfd_open(int(children[0])) if children else None
    except (OSError, ValueError, AttributeError):
        return None


def stop(proc: subprocess.Popen, contained: bool = True) -> None:
    """SIGKILLs ``proc`` and everything it started, and reaps it.

    ``contained``: ``proc`` came from :func:`start`. In ``"namespaces"`` mode this then returns
    once the kernel has emptied its PID namespace; otherwise its process group is killed. The
    child is not reaped before ``killpg``: while it is a zombie its pid (= the group id) cannot
    be reused, so the kill cannot hit an unrelated group.
    """
    init = _namespace_init(proc.pid) if contained and containment().mode == "namespaces" else None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if init is not None:
        try:
            signal.pidfd_send_signal(init, signal.SIGKILL)  # its death takes the namespace with it
        except OSError:
            pass
        select.select([init], [], [], _TREE_DEATH_WAIT_S)  # readable once it (and so all) ended
        os.close(init)
    proc.wait()


def wait_then_stop(proc: subprocess.Popen, timeout_s: float, contained: bool = True) -> bool:
    """Waits up to ``timeout_s`` for ``proc`` to exit, then :func:`stop`\\ s it. True if it exited in time."""
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
    stop(proc, contained)
    return exited
