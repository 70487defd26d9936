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
