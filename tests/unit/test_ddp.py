"""Data parallel: 2 processes (torchrun, gloo, CPU) x batch b equal 1 process x batch 2b.

tests/unit/ddp_worker.py trains tiny_bert AdaLoRA (direct with the peft and sigma-grad
policies; hyper per_forward and per_step) for 10 steps with pruning from step 2 through DDP
(``wrap_ddp``); this test compares every rank with a single-process run on the whole batch:
losses within 1e-5, the same rank pattern, and identical masks, hypernetwork states,
allocator state and parameters on both ranks. A negative control (plain DDP without
``prepare_ddp``, hyper source) shows the ranks' allocators diverge and ``assert_in_sync``
catches it. The direct and hyper runs also go through ``AdaptedTrainer`` under torchrun.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import ddp_worker as worker
from launch import run_two_ranks

SYNCED = ["direct", "direct_sigma", "hyper", "hyper_per_step"]
THROUGH_TRAINER = ["direct", "hyper"]  # the same runs through AdaptedTrainer under torchrun

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this build")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    names = SYNCED + ["hyper_unsynced"] + [f"trainer:{n}" for n in THROUGH_TRAINER]
    yield out, run_two_ranks("ddp_worker.py", out, names, timeout=600)
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def reference():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield {name: worker.run_config(name, world=1) for name in SYNCED}
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", SYNCED)
def test_two_ranks_equal_one_process_with_the_whole_batch(ddp_run, reference, name):
    out, results = ddp_run
    ref = reference[name]
    for rank, res in enumerate(r[name] for r in results):
        assert res["in_sync"], f"rank {rank}: {res['error']}"
        torch.testing.assert_close(torch.tensor(res["losses"], dtype=torch.float64),
                                   torch.tensor(ref["losses"], dtype=torch.float64), rtol=0, atol=1e-5)
        assert res["rank_pattern"] == ref["rank_pattern"], f"rank {rank} pruned differently from 1 process"
        assert res["budget"] == ref["budget"]
    pattern = ref["rank_pattern"]
    assert sum(not keep for row in pattern.values() for keep in row) > 0, "the run must prune"

    # Identical on both ranks: every checksum, and every saved tensor bit for bit.
    assert results[0][name]["checksums"] == results[1][name]["checksums"]
    t0, t1 = (load_file(str(out / f"{name}_rank{r}.safetensors")) for r in (0, 1))
    assert t0.keys() == t1.keys() == ref["tensors"].keys()
    for key in t0:
        assert torch.equal(t0[key], t1[key]), f"{key} differs between ranks"
        if key.startswith("state/"):
            assert torch.equal(t0[key], ref["tensors"][key]), key
        else:  # hypernetwork states and trainable parameters: as the 1-process run, up to rounding
            torch.testing.assert_close(t0[key], ref["tensors"][key], rtol=0, atol=1e-5, msg=key)
    if name.startswith("hyper"):
        assert any(k.startswith("source/state_") for k in t0)


@pytest.mark.parametrize("name", THROUGH_TRAINER)
def test_adapted_trainer_under_torchrun_equals_one_process(ddp_run, reference, name):
    _, results = ddp_run
    ref = reference[name]
    for rank, res in enumerate(r[f"trainer:{name}"] for r in results):
        assert res["in_sync"], f"rank {rank}: {res['error']}"
        torch.testing.assert_close(torch.tensor(res["losses"], dtype=torch.float64),
                                   torch.tensor(ref["losses"], dtype=torch.float64), rtol=0, atol=1e-5)
        assert res["rank_pattern"] == ref["rank_pattern"]
    assert results[0][f"trainer:{name}"]["checksums"] == results[1][f"trainer:{name}"]["checksums"]


def test_without_prepare_ddp_the_hyper_allocators_diverge_and_the_check_says_so(ddp_run):
    _, results = ddp_run
    for res in (r["hyper_unsynced"] for r in results):
        assert not res["in_sync"]
        assert "allocator/exp_avg_ipt" in res["error"]
        assert res["first_divergence"] is not None and res["first_divergence"] <= 2


def test_single_process_helpers_are_no_ops():
    """prepare_ddp / sync / assert_in_sync work (and do nothing) without a process group."""
    from tiny_models import tiny_bert

    import hyperadalora as ha
    from hyperadalora.integrations.distributed import (
        assert_in_sync,
        prepare_ddp,
        sync_generated_gradients,
    )

    model = ha.wrap(tiny_bert(), worker.config("hyper_per_step"))
    prepare_ddp(model)
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    assert {f"source.{n}" for n, _ in model.hyper.named_parameters()} <= ignored  # per_step: outside DDP
    assert {f"source.{n}" for n, _ in model.hyper.named_buffers()} <= ignored
    assert not any(n.startswith("model.") and not n.endswith("rank_mask") for n in ignored)
    assert not sync_generated_gradients(model)
    sums = assert_in_sync(model)
    assert any(k.startswith("state/") and k.endswith(".rank_mask") for k in sums)
    assert any(k.startswith("source/hyper.state_") for k in sums)
