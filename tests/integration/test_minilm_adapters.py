"""Integration: the real packaged MiniLM checkpoint with real RTE rows (a few optimizer steps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hyperadalora as ha

pytestmark = pytest.mark.integration

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def minilm_and_rows():
    from hyperadalora.data.glue import read_glue
    from hyperadalora.models import load_model

    if not (DATA_DIR / "rte" / "train.tsv").is_file():
        pytest.skip(f"real RTE data not found at {DATA_DIR}")
    try:
        model, tok = load_model("minilm", task="sequence-classification", num_labels=2)
    except (ImportError, FileNotFoundError) as exc:  # the model package is not installed
        pytest.skip(f"packaged MiniLM unavailable: {exc}")
    rows = read_glue("rte", "train", DATA_DIR)[:8]
    batch = tok([r.text_a for r in rows], [r.text_b for r in rows], truncation=True, max_length=96,
                padding=True, return_tensors="pt")
    batch["labels"] = torch.tensor([r.label for r in rows])
    return model, batch


@pytest.mark.parametrize("method,source", [("adalora", "direct"), ("lora", "direct"), ("adalora", "hyper")])
def test_real_minilm_loss_decreases_on_repeated_rte_batch(minilm_and_rows, method, source):
    import copy

    base, batch = minilm_and_rows
    kw = dict(method=method, target_modules="all-linear", modules_to_save=("classifier",), seed=0, source=source)
    if method == "adalora":
        kw.update(r=8, lora_alpha=16, gamma=0.1,
                  allocator=ha.AllocatorConfig(total_step=10, target_r=4, tinit=1, tfinal=1))
    model = ha.wrap(copy.deepcopy(base), ha.AdapterConfig(**kw))
    assert len(model.adapted_layers) == 6 * 6 + 1  # every encoder linear plus the pooler
    opt = torch.optim.AdamW(model.optimizer_param_groups(lr=2e-3))
    model.train()
    losses = []
    for step in range(3):
        out = model(**batch)
        out.loss.backward()
        opt.step()
        model.after_step(step)
        opt.zero_grad()
        # The task loss: the orthogonality regulariser in out.loss rises while P and Q leave their init.
        losses.append(model.last_task_loss)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[2] < losses[0], losses
    if source == "hyper":  # one hypernetwork call per (kind, shape) group and training forward
        assert sum(model.hyper.calls_per_kind().values()) == 3 * len(model.hyper.groups)
