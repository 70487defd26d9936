"""``torch.compile`` of a wrapped model (CPU inductor): the same losses as eager, no graph break.

Marked slow: compiling the tiny BERT's forward and backward takes ~30-60 s on 2 CPU cores. The
first two compiled steps compile (the second recompiles once: transformers sets
``config.problem_type`` on the first classification forward); after that the graph is reused.
"""

from __future__ import annotations

import pytest
import torch

import hyperadalora as ha
from tiny_models import BERT_TARGETS, bert_batch, tiny_bert

pytestmark = pytest.mark.slow
STEPS = 4


def build(source: str) -> ha.AdaptedModel:
    cfg = ha.AdapterConfig(method="lora", r=4, lora_alpha=8, target_modules=BERT_TARGETS, modules_to_save=["classifier"],
                           seed=0, source=source, hyper=ha.HyperConfig(hidden=24, layers=1))
    return ha.wrap(tiny_bert(), cfg).train()


def train(model) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(STEPS):
        loss = model(**bert_batch(step % 3)).loss
        loss.backward()
        model.backward_hypernetworks()
        opt.step()
        model.after_step(step)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("source", ["direct", "hyper"])
def test_compiled_model_trains_like_eager(source):
    torch._dynamo.reset()
    eager, compiled = build(source), build(source)
    compiled.model.compile()  # in place: parameter names, saving and export are unchanged
    losses_eager, losses_compiled = train(eager), train(compiled)
    torch.testing.assert_close(torch.tensor(losses_compiled), torch.tensor(losses_eager), rtol=1e-5, atol=1e-6)
    assert losses_eager[0] != losses_eager[-1]
    assert set(compiled.state_dict()) == set(eager.state_dict())


def test_the_adapted_forward_has_no_graph_break():
    torch._dynamo.reset()
    model = build("direct")
    explanation = torch._dynamo.explain(model.model)(**bert_batch(0))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1
