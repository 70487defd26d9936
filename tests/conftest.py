import sys
from pathlib import Path

# Lets tests import the shared tiny-model helpers as `tiny_models`.
sys.path.insert(0, str(Path(__file__).resolve().parent / "unit"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run much faster on one thread (no spin-waiting on a shared 2-core machine);
    integration tests on the real checkpoints keep the default."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def humaneval_file(tmp_path):
    """A ``HumanEval.jsonl.gz`` with the first 3 real problems (the unit tests need no data folder)."""
    from real_rows import write_humaneval_gz

    return write_humaneval_gz(tmp_path / "HumanEval.jsonl.gz")


@pytest.fixture
def gsm8k_file(tmp_path):
    """A GSM8K ``test.jsonl`` with 3 real rows (plain, thousands separators, a negative answer)."""
    from real_rows import write_gsm8k_jsonl

    return write_gsm8k_jsonl(tmp_path / "test.jsonl")


@pytest.fixture
def no_network(monkeypatch):
    """Offline: the Hugging Face offline switches set, and any socket connection fails loudly (so a
    read that tried the network fails instead of passing on a machine that happens to be online)."""
    import socket

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted while offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
