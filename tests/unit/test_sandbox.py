"""The HumanEval sandbox: outcomes, limits, fences, cleanup, HumanEval plumbing.

Every program here runs in a child process; each run takes ~0.1 s, the timeout test ~2 s.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import signal
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from hyperadalora.eval import containment, sandbox
from hyperadalora.eval.sandbox import (
    ExecutionResult,
    humaneval_pass_at_1,
    humaneval_program,
    read_humaneval,
    run_program,
)


def test_correct_program_passes():
    result = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')\n")
    assert result == ExecutionResult(True, "passed", "ok\n", result.seconds)
    assert 0 < result.seconds < 5


def test_wrong_assertion_fails_with_the_traceback():
    result = run_program("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n")
    assert (result.passed, result.status) == (False, "failed")
    assert "AssertionError" in result.detail and "assert add(2, 3) == 5" in result.detail


def test_syntax_error_and_exit_are_failures():
    assert run_program("def f(:\n").status == "failed"
    # sys.exit(0) before the tests run must not count as a pass
    result = run_program("import sys\nsys.exit(0)\nassert False\n")
    assert (result.passed, result.status) == (False, "failed") and "SystemExit(0)" in result.detail
    assert "exit is disabled" in run_program("exit(0)\n").detail


def test_infinite_loop_is_stopped_by_the_timeout():
    result = run_program("while True:\n    pass\n", timeout_s=2)
    assert (result.passed, result.status) == (False, "timeout")
    assert 1.9 < result.seconds < 4


def test_unbounded_allocation_is_stopped_and_the_host_is_unharmed():
    before = resource.getrlimit(resource.RLIMIT_AS)
    result = run_program("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n", timeout_s=10, memory_mb=256)
    assert (result.passed, result.status) == (False, "failed")
    assert "MemoryError" in result.detail or "killed by" in result.detail
    assert resource.getrlimit(resource.RLIMIT_AS) == before  # the limit was set in the child only
    assert len(bytearray(300 * 2**20)) == 300 * 2**20  # the host can still go past 256 MiB


def test_stdin_is_empty_and_the_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("SECRET_TOKEN", "do-not-leak")
    assert "EOFError" in run_program("input()\n").detail
    result = run_program(
        "import os\n"
        "assert 'HTTPS_PROXY' not in os.environ and 'SECRET_TOKEN' not in os.environ, dict(os.environ)\n"
        "assert os.environ['HOME'] == os.getcwd() == os.environ['TMPDIR']\n"
    )
    assert result.passed, result.detail


def test_temporary_directory_is_removed_afterwards():
    result = run_program("import os\nopen('scratch.txt', 'w').write('x')\nos.mkdir('sub')\nprint(os.getcwd())\n")
    assert result.passed, result.detail
    workdir = Path(result.detail.strip())
    assert workdir.name.startswith("hyperadalora-sandbox-")
    assert workdir.parent == Path(tempfile.gettempdir())
    assert not workdir.exists()


@pytest.mark.parametrize("attack", [
    "import os\nos.remove({path!r})",
    "import os\nos.unlink({path!r})",
    "import os\nos.rename({path!r}, 'stolen.txt')",
    "import shutil\nshutil.rmtree({dir!r})",
    "open({path!r}, 'w').write('overwritten')",
    "import os\nos.truncate({path!r}, 0)",
    # undo the monkeypatch by re-importing posix: the audit hook still refuses
    "import sys, importlib\ndel sys.modules['posix']\nimport posix\nposix.unlink({path!r})",
    "import sys, importlib\ndel sys.modules['posix']\nimport posix\n"
    "fd = posix.open({path!r}, posix.O_WRONLY | posix.O_TRUNC)",
])
def test_files_outside_the_sandbox_are_left_intact(tmp_path, attack):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    result = run_program(attack.format(path=str(victim), dir=str(tmp_path)))
    assert (result.passed, result.status) == (False, "failed")
    assert "PermissionError" in result.detail
    assert victim.read_text() == "precious"


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    yield server
    server.close()


def _assert_no_connection(server):
    with pytest.raises(BlockingIOError):
        server.accept()


@pytest.mark.parametrize("attack", [
    "import socket\nsocket.socket()",
    "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
    "import _socket\n_socket.socket()",
    # the real socket type, dug out from under the replacement: the audit hook refuses it
    "import socket\nreal = socket.socket.__mro__[2]\ns = real()\ns.connect(('127.0.0.1', {port}))",
])
def test_sockets_are_refused(listener, attack):
    result = run_program(attack.format(port=listener.getsockname()[1]))
    assert (result.passed, result.status) == (False, "failed")
    assert "PermissionError" in result.detail
    _assert_no_connection(listener)


def test_network_namespace_has_no_route_to_the_host(listener, tmp_path):
    # The fence under the prelude: a child in the sandbox's namespaces, with no prelude at all.
    fences = sandbox.containment()
    if not fences.prefix and not fences.unshare_flags:
        pytest.skip("this kernel does not let us create network namespaces")
    code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), timeout=2)\n"
            "except OSError as e:\n    print('refused', e)\nelse:\n    print('CONNECTED')\n")
    with tempfile.TemporaryFile() as out:
        proc = containment.start([sys.executable, "-I", "-c", code], cwd=str(tmp_path),
                                 env=containment.child_env(str(tmp_path)), stdout=out, limits=[])
        assert containment.wait_then_stop(proc, 30)
        out.seek(0)
        text = out.read().decode()
    assert text.startswith("refused"), text
    _assert_no_connection(listener)


@pytest.mark.parametrize("attack", [
    "import os\nwhile True:\n    os.fork()",
    "import posix\nposix.fork()",
    "import sys, importlib\ndel sys.modules['posix']\nimport posix\nposix.fork()",
    "import subprocess\nsubprocess.run(['true'])",
    "import os\nos.system('true')",
    "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "import ctypes",
    "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
])
def test_processes_signals_ctypes_and_rlimits_are_refused(attack):
    result = run_program(attack)
    assert (result.passed, result.status) == (False, "failed"), result.detail
    assert "PermissionError" in result.detail or "ImportError" in result.detail or "ModuleNotFoundError" in result.detail


def test_files_inside_the_sandbox_directory_can_be_written_and_read():
    result = run_program("open('data.txt', 'w').write('hello')\nassert open('data.txt').read() == 'hello'\n")
    assert result.passed, result.detail


def test_output_is_truncated():
    result = run_program("print('A' * 50_000)\nprint('the end')\n")
    assert result.passed
    assert len(result.detail) < 4200
    assert result.detail.startswith("AAA") and result.detail.rstrip().endswith("the end")
    assert "truncated" in result.detail


def test_cpu_limit_signal_counts_as_timeout_and_other_signals_as_failure():
    assert sandbox._classify(-signal.SIGXCPU, False, "", 1.0, 5.0).status == "timeout"
    killed = sandbox._classify(-signal.SIGKILL, False, "", 1.0, 5.0)
    assert (killed.status, killed.detail.splitlines()[0]) == ("failed", "killed by SIGKILL")


def test_bad_arguments():
    with pytest.raises(TypeError):
        run_program(b"print(1)")
    with pytest.raises(ValueError, match="timeout_s"):
        run_program("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_program("pass", memory_mb=-1)


# ------------------------------------------------------------------------------- HumanEval

PROBLEM = {
    "task_id": "Toy/0",
    "prompt": "def double(x):\n    \"\"\"Twice x.\"\"\"\n",
    "canonical_solution": "    return 2 * x\n",
    "test": "\n\ndef check(candidate):\n    assert candidate(3) == 6\n    assert candidate(-1) == -2\n",
    "entry_point": "double",
}


def test_humaneval_program_layout():
    assert humaneval_program(PROBLEM, "    return x + x\n") == (
        PROBLEM["prompt"] + "    return x + x\n" + "\n" + PROBLEM["test"] + "\ncheck(double)\n")
    with pytest.raises(ValueError, match="'entry_point'"):
        humaneval_program({"prompt": "", "test": ""}, "")


def test_pass_at_1_keeps_order_with_workers():
    completions = ["    return 2 * x\n", "    return x\n", "    return x + x\n", "    while True: pass\n"]
    score, results = humaneval_pass_at_1([PROBLEM] * 4, completions, timeout_s=1, workers=2)
    assert score == 0.5
    assert [r.status for r in results] == ["passed", "failed", "passed", "timeout"]
    with pytest.raises(ValueError, match="length mismatch"):
        humaneval_pass_at_1([PROBLEM], [])
    with pytest.raises(ValueError, match="empty"):
        humaneval_pass_at_1([], [])


def test_read_humaneval_roundtrip_and_errors(tmp_path):
    good = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(good, "wt", encoding="utf-8") as f:
        f.write(json.dumps(PROBLEM) + "\n\n")
    assert read_humaneval(good) == [PROBLEM]

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(PROBLEM) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_humaneval(bad_json)

    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({k: v for k, v in PROBLEM.items() if k != "test"}) + "\n")
    with pytest.raises(ValueError, match=r"missing.jsonl:1: missing or non-string field\(s\) test"):
        read_humaneval(missing)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no HumanEval problems"):
        read_humaneval(empty)


def test_real_humaneval_canonical_solutions_pass(humaneval_file):
    problems = read_humaneval(humaneval_file)
    assert len(problems) == 3 and problems[0]["task_id"] == "HumanEval/0"
    first = problems
    score, results = humaneval_pass_at_1(first, [p["canonical_solution"] for p in first])
    assert score == 1.0, [r.detail for r in results if not r.passed]
    # and a wrong body fails the real tests
    score, results = humaneval_pass_at_1(first[:1], ["    return not True\n"])
    assert score == 0.0 and "AssertionError" in results[0].detail


@pytest.mark.parametrize("program", [
    "import os\nos.remove('/dev/null')",
    "import os\nopen('x', 'w').close()\nos.replace('x', '/dev/null')",
    "import os\nopen('x', 'w').close()\nos.rename('x', '/dev/null')",
    # past the replaced functions, straight to the audit hook
    "import sys\ndel sys.modules['posix']\nimport posix\nopen('x', 'w').close()\nposix.rename('x', '/dev/null')",
])
def test_dev_null_can_be_written_but_never_removed_or_replaced(program):
    import stat

    assert run_program("open('/dev/null', 'w').write('x')\n").passed
    result = run_program(program)
    assert not result.passed and "PermissionError" in result.detail, result.detail
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # still the character device


def test_humaneval_prompt_asks_a_chat_model_for_a_fenced_function():
    from test_instruct_data import make_tokenizer

    from hyperadalora.tasks import humaneval_prompt

    code = 'def add(a, b):\n    """a + b"""\n'
    assert humaneval_prompt(code, make_tokenizer(chat=False)) == code  # Codex convention: continue the stub
    assert humaneval_prompt(code, make_tokenizer(chat=True)) == (
        "<user> Complete the following Python function.\n\n```python\n" + code + "``` <bot>```python\n")


def test_a_chat_models_fenced_function_runs_against_the_real_tests(humaneval_file):
    from hyperadalora.tasks import humaneval_completion

    first = read_humaneval(humaneval_file)[:3]
    # What a chat model writes inside the fence: the whole function (imports and all), the fence, prose.
    right = [p["prompt"] + p["canonical_solution"] + "\n```\nThis function checks the input.\n" for p in first]
    score, results = humaneval_pass_at_1(first, [humaneval_completion(g, chat=True) for g in right])
    assert score == 1.0, [r.detail for r in results if not r.passed]
    # Top-level test code after the function is not run; a wrong function fails the real tests.
    wrong = first[0]["prompt"] + "    return not True\n\nassert has_close_elements([], 1.0)\n```"
    completion = humaneval_completion(wrong, chat=True)
    assert "assert has_close" not in completion
    score, results = humaneval_pass_at_1(first[:1], [completion])
    assert score == 0.0 and "AssertionError" in results[0].detail
    # Without chat the completion is the body, cut at the next top-level block.
    assert humaneval_completion("    return 1\n\ndef other():\n", chat=False) == "    return 1\n"
