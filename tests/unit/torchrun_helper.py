"""Launching a two-process ``torchrun`` (gloo, CPU) from a unit test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

HERE = Path(__file__).resolve().parent


def torchrun_two_ranks(args: list[str], timeout: float = 600) -> str:
    """Runs ``torchrun --standalone --nproc_per_node 2 ARGS`` in tests/unit with ``src`` and tests/unit on
    ``PYTHONPATH``; fails the test (with the output's tail) on a non-zero exit or a timeout.

    Returns:
        The standard output.
    """
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = ([str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"])
    cmd += ["--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parents[1] / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(HERE),
                            start_new_session=True)  # a session of its own: a timeout ends the workers too
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout:g} s:\n{stdout[-3000:]}\n{stderr[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return stdout
