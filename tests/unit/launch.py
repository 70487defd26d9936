"""Runs a test worker under ``torchrun --standalone --nproc_per_node 2`` (gloo, CPU), shared by
the distributed tests (test_ddp.py, test_fsdp.py, test_trl_integration.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

HERE = Path(__file__).resolve().parent


def torchrun_command() -> list[str]:
    """``torchrun`` beside this Python, else ``python -m torch.distributed.run``."""
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def torchrun_two_ranks(args: list[str], timeout: float = 600) -> str:
    """Runs ``torchrun --standalone --nproc_per_node 2 ARGS`` in tests/unit with ``src`` and tests/unit on
    ``PYTHONPATH``; fails the test (with the output's tail) on a non-zero exit or a timeout.

    Returns:
        The standard output.
    """
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parents[1] / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = torchrun_command() + ["--standalone", "--nproc_per_node", "2", *args]
    # A session of its own, so that a timeout ends torchrun *and* its workers.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=str(HERE), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout:g} s:\n{stdout[-3000:]}\n{stderr[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return stdout


def run_two_ranks(worker: str, out: Path, names: list[str], timeout: int) -> list[dict]:
    """Runs ``worker OUT NAMES`` on 2 ranks and returns each rank's ``results`` from
    ``OUT/rank<k>.json``; fails the test (with the tail of the output) on error or timeout."""
    torchrun_two_ranks([str(HERE / worker), str(out), ",".join(names)], timeout)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    return [r["results"] for r in ranks]
