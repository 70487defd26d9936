"""Issue 21: a program that tries on purpose can neither forge a HumanEval pass nor escape the sandbox.

The attacks come from the issue. Item 1: a completion reaches the runner's own exit, or returns an
object equal to everything. Item 2: past the in-process guards (undone below through ``gc`` and the
audit hook's closure), a child that calls ``setsid()`` outlives the sandbox, and the program signals
the evaluating process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hyperadalora.eval import containment, sandbox
from hyperadalora.eval.sandbox import humaneval_pass_at_1, run_program
from test_sandbox import PROBLEM  # the toy problem: double(x), checked against 6 and -2

SRC = Path(__file__).resolve().parents[2] / "src"


# Undoes the prelude from inside: every cell of the audit hook's closure that holds a rule is
# emptied (its events, its path checks), and `posix` is re-imported with its real functions.
BYPASS = '''
import gc, sys
for obj in gc.get_objects():
    if type(obj).__name__ == "function" and obj.__name__ == "hook" and obj.__closure__:
        for cell in obj.__closure__:
            value = cell.cell_contents
            if isinstance(value, (frozenset, set)):
                cell.cell_contents = frozenset()
            elif isinstance(value, dict):
                cell.cell_contents = {}
            elif isinstance(value, int):
                cell.cell_contents = 0
            elif callable(value):
                cell.cell_contents = lambda *args, **kwargs: True
        print("HOOK DISABLED", flush=True)
del sys.modules["posix"]
import posix
'''


def _one_result(completion: str):
    score, (result,) = humaneval_pass_at_1([PROBLEM], [completion], timeout_s=5)
    return score, result


def test_the_real_solution_still_passes():
    assert _one_result("    return 2 * x\n")[0] == 1.0


@pytest.mark.parametrize("completion", [
    # the one-liner: the runner's own exit, found one frame up
    "    return 0\nimport sys; sys._getframe(1).f_locals['finish'](0)\n",
    # any frame's `finish`, looked for when the tests call the function
    "    import sys\n    f = sys._getframe()\n    while f is not None:\n"
    "        if callable(f.f_locals.get('finish')):\n            f.f_locals['finish'](0)\n"
    "        f = f.f_back\n    return 0\n",
    # the real _exit, past the monkeypatches (no audit event guards it)
    "    return 0\nimport sys; del sys.modules['posix']; import posix; posix._exit(0)\n",
    "    import sys; del sys.modules['posix']; import posix; posix._exit(0)\n",
])
def test_exiting_early_with_status_zero_is_not_a_pass(completion):
    score, result = _one_result(completion)
    assert (score, result.status) == (0.0, "failed"), result.detail


@pytest.mark.parametrize("completion", [
    "    class Yes:\n        def __eq__(self, other):\n            return True\n    return Yes()\n",
    "    class Yes(int):\n        def __eq__(self, other):\n            return True\n"
    "        __hash__ = int.__hash__\n    return Yes(0)\n",
    "    class Yes(list):\n        def __eq__(self, other):\n            return True\n    return Yes()\n",
])
def test_an_object_equal_to_everything_is_not_a_pass(completion):
    score, result = _one_result(completion)
    assert (score, result.status) == (0.0, "failed"), result.detail
    assert "plain" in result.detail  # the reason: only plain values come back from the program


def test_the_bypass_reaches_the_real_functions():
    # Guards the tests below: past the prelude, fork is no longer refused by the audit hook.
    result = run_program(BYPASS + "pid = posix.fork()\nif pid == 0:\n    posix._exit(0)\nposix.waitpid(pid, 0)\n"
                         "print('FORKED')\n")
    assert "HOOK DISABLED" in result.detail and "FORKED" in result.detail, result.detail


def _processes_with(tag: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and tag.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # it ended while we looked
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc to find the survivor")
def test_a_detached_grandchild_dies_with_the_sandbox():
    # The escape: setsid() leaves the process group; the grandchild (found by a tag in its
    # command line) keeps trying to write a file. Where the file system is sealed the writes fail,
    # so its being alive is what the test looks at.
    shared = Path(tempfile.mkdtemp(prefix="sandbox-escape-"))
    shared.chmod(0o1777)  # writable by whichever uid the sandbox runs as
    marker, tag = shared / "alive", f"survivor-{os.getpid()}-{time.monotonic_ns()}"
    survivor = ("import os, time\nfor _ in range(40):\n    time.sleep(0.1)\n    try:\n"
                f"        fd = os.open({str(marker)!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)\n"
                "        os.write(fd, b'x')\n        os.close(fd)\n    except OSError:\n        pass\n")
    attack = BYPASS + (
        "pid = posix.fork()\n"
        "if pid == 0:\n"
        "    posix.setsid()\n"
        "    if posix.fork() == 0:\n"
        f"        posix.execv(sys.executable, [sys.executable, '-c', {survivor!r}, {tag!r}])\n"
        "    posix._exit(0)\n"
        "posix.waitpid(pid, 0)\n"
        "import time\n"
        "time.sleep(0.3)\n"
        "print('DETACHED')\n")
    try:
        result = run_program(attack, timeout_s=5)
        assert "HOOK DISABLED" in result.detail and "DETACHED" in result.detail, result.detail
        size_then = marker.stat().st_size if marker.exists() else 0
        assert _processes_with(tag) == [], "a process the sandbox started outlived it"
        time.sleep(1.0)
        assert (marker.stat().st_size if marker.exists() else 0) == size_then, "something still writes files"
    finally:
        for pid in _processes_with(tag):
            os.kill(pid, 9)
        for path in shared.iterdir():
            path.unlink()
        shared.rmdir()


def test_the_program_cannot_signal_the_evaluator_or_its_neighbours():
    # The evaluator runs in its own process, so a successful kill cannot take pytest down with it.
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    evaluator = (
        "import os, sys\n"
        "from hyperadalora.eval.sandbox import run_program\n"
        "targets = (os.getpid(), int(sys.argv[2]))\n"
        "attack = sys.argv[1] + ''.join(\n"
        "    f'try:\\n    posix.kill({pid}, 9)\\n    print(\"KILLED {pid}\")\\n'\n"
        "    f'except OSError as e:\\n    print(\"refused\", type(e).__name__)\\n' for pid in targets)\n"
        "result = run_program(attack)\n"
        "print('EVALUATOR ALIVE', result.status)\n"
        "print(result.detail)\n")
    try:
        out = subprocess.run([sys.executable, "-c", evaluator, BYPASS, str(decoy.pid)], capture_output=True,
                             text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(SRC)})
        assert out.returncode == 0 and "EVALUATOR ALIVE" in out.stdout, (out.returncode, out.stdout, out.stderr)
        assert "HOOK DISABLED" in out.stdout and "KILLED" not in out.stdout, out.stdout
        assert out.stdout.count("refused") == 2, out.stdout
        assert decoy.poll() is None, "the program killed another process of the evaluator's user"
    finally:
        decoy.kill()
        decoy.wait()


def test_the_containment_is_reported():
    report = sandbox.containment()
    assert report.mode in ("namespaces", "process-group")
    if sys.platform.startswith("linux") and Path("/usr/bin/unshare").exists() and os.geteuid() == 0:
        # the project's CI machines: root, util-linux present, Linux >= 5.12
        assert (report.mode, report.sealed) == ("namespaces", True)


def test_past_the_prelude_the_file_system_is_read_only_and_the_homes_are_empty():
    fences = sandbox.containment()
    if not fences.sealed:
        pytest.skip("this machine cannot seal the sandbox's file system (see the sandbox docs)")
    shared = Path(tempfile.mkdtemp(prefix="sandbox-escape-"))
    shared.chmod(0o1777)
    victim = shared / "victim.txt"
    victim.write_text("precious")
    victim.chmod(0o666)
    config = containment.seal_config(str(shared))
    attack = BYPASS + (
        "import json, os\n"
        "try:\n"
        f"    open({str(victim)!r}, 'w').write('gone')\n"
        "except OSError as e:\n"
        "    print('WRITE REFUSED', e.strerror)\n"
        f"print('HOMES', json.dumps({{h: sorted(os.listdir(h)) for h in {config['hide']!r}}}))\n")
    try:
        result = run_program(attack)
        assert "HOOK DISABLED" in result.detail and "WRITE REFUSED Read-only file system" in result.detail, result.detail
        assert victim.read_text() == "precious"
        homes = json.loads(result.detail.split("HOMES ", 1)[1].splitlines()[0])
        assert set(homes) == set(config["hide"]) and "/root" in homes or os.geteuid() != 0
        for home, names in homes.items():  # only the way to the Python installation is left
            on_the_way = {os.path.relpath(k, home).split(os.sep)[0] for k in config["keep"]
                          if k.startswith(home.rstrip("/") + "/")}
            assert set(names) <= on_the_way, (home, names)
    finally:
        victim.unlink()
        shared.rmdir()
