"""AdapterConfig.init_from: an adapter started from another run's factors or hypernetworks.

References: the source adapter's own saved tensors (a round trip through the folder), and a
fresh wrap with the same seed for what must *not* transfer (task heads, allocator state).
"""

from __future__ import annotations

import copy
import dataclasses
import shutil

import pytest
import torch

import hyperadalora as ha
from hyperadalora.checkpoint import load_adapter
from tiny_models import BERT_TARGETS, bert_batch, tiny_bert, train_steps

HYPER = ha.HyperConfig(hidden=16, layers=1)


def config(method="adalora", source="direct", seed=3, **kw):
    alloc = ha.AllocatorConfig(total_step=8, target_r=2, tinit=1, tfinal=2, deltaT=1) if method == "adalora" else None
    return ha.AdapterConfig(method=method, source=source, r=4, lora_alpha=8, seed=seed, target_modules=BERT_TARGETS,
                            modules_to_save=("classifier",), allocator=alloc, hyper=HYPER, **kw)


def source_run(tmp_path, method="adalora", source="direct"):
    """A trained, saved source adapter (a run folder with adapter/ in it, as `hyperadalora train` writes)."""
    model = ha.wrap(tiny_bert(), config(method, source))
    train_steps(model, 8)
    model.save_adapter(str(tmp_path / "run" / "adapter"))
    return model, tmp_path / "run"


def factors(model):
    model.eval()
    with torch.no_grad():
        return {n: {k: v.detach().clone() for k, v in layer.get_factors().items()}
                for n, layer in model.adapted_layers.items()}


@pytest.mark.parametrize("method,source", [("adalora", "direct"), ("adalora", "hyper"), ("dora", "direct"),
                                           ("lora", "hyper")])
def test_factors_or_hypernetworks_transfer_and_task_state_starts_fresh(tmp_path, method, source):
    trained, run = source_run(tmp_path, method, source)
    started = ha.wrap(tiny_bert(), config(method, source, seed=99, init_from=str(run)))
    fresh = ha.wrap(tiny_bert(), config(method, source, seed=99))
    for name, kinds in factors(trained).items():
        got = factors(started)[name]
        for kind, value in kinds.items():  # the generated (or trained) factors of the source run
            torch.testing.assert_close(got[kind], value, rtol=0, atol=0)
    if method == "dora":
        for name, layer in trained.adapted_layers.items():
            torch.testing.assert_close(started.adapted_layers[name].magnitude, layer.magnitude, rtol=0, atol=0)
    for a, b in zip(started.hypernetwork_parameters(), trained.hypernetwork_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Task heads and the allocator are this run's own: as a fresh wrap with the same seed.
    head = dict(started.model.classifier.named_parameters())
    for pname, p in fresh.model.classifier.named_parameters():
        torch.testing.assert_close(head[pname], p, rtol=0, atol=0)
    assert started.steps_taken == 0 and all(all(keep) for keep in started.rank_pattern.values())
    if method == "adalora":
        assert not all(all(keep) for keep in trained.rank_pattern.values())  # the source had pruned


def test_the_started_run_trains_saves_and_loads_without_its_source(tmp_path):
    _, run = source_run(tmp_path, "adalora", "hyper")
    started = ha.wrap(tiny_bert(), config("adalora", "hyper", seed=5, init_from=str(run / "adapter")))
    losses = train_steps(started, 8)
    assert all(torch.isfinite(torch.tensor(losses)))
    started.save_adapter(str(tmp_path / "target"))
    shutil.rmtree(run)  # the provenance stays in the config, the weights are the target's own
    loaded = load_adapter(tiny_bert(), tmp_path / "target")
    assert loaded.adapter_config.init_from is None
    batch = {k: v for k, v in bert_batch(4).items() if k != "labels"}
    started.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, started(**batch).logits)


def test_bad_sources_fail_before_the_model_is_touched(tmp_path):
    base = tiny_bert()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(FileNotFoundError, match="neither a saved adapter nor a run folder"):
        ha.wrap(base, config(init_from=str(tmp_path / "nowhere")))
    assert not any(isinstance(m, ha.AdaptedLinear) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    _, run = source_run(tmp_path, "adalora", "direct")
    with pytest.raises(ValueError, match="holds a method='adalora' adapter with source='direct'"):
        ha.wrap(tiny_bert(), config("adalora", "hyper", init_from=str(run)))
    with pytest.raises(ValueError, match="same base model, ranks"):
        ha.wrap(tiny_bert(), dataclasses.replace(config(init_from=str(run)), r=6))
    with pytest.raises(TypeError, match="init_from must be a folder path"):
        config(init_from="")
