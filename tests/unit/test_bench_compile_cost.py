"""The compile benchmark's graph-break count (issue 23, item 5) on a tiny BERT, and its option checks."""

from __future__ import annotations

import pytest
import torch

from hyperadalora.bench.experiments import compile_cost
from tiny_models import bert_batch, tiny_bert


@pytest.mark.parametrize("variant", ["lora", "hyperadalora"])
def test_the_training_forward_is_one_graph_for_both_sources(variant):
    explained = compile_cost.graph_breaks(tiny_bert(), variant, bert_batch(0))
    assert explained == {"graphs": 1, "breaks": 0, "reasons": []}


def test_generating_inside_the_compiled_region_would_break_the_graph():
    # The control: the hyper source's lazy generation inside the inner model's forward marks the
    # factors with retain_grad (the default per-forward generation), which dynamo cannot trace;
    # graph_breaks generates first, as AdaptedModel.forward does, and so counts the graph training
    # compiles.
    torch._dynamo.reset()
    model = compile_cost.wrap(tiny_bert(), "hyperadalora")
    assert model.source.config.generate == "per_forward"
    explanation = torch._dynamo.explain(model.model)(**bert_batch(0))
    assert explanation.graph_break_count > 0
    assert any("retain_grad" in str(b.reason) for b in explanation.break_reasons)


def test_cli_refuses_unknown_variants_and_a_warmup_that_would_time_the_recompile():
    with pytest.raises(SystemExit):
        compile_cost.parse_args(["--variants", "dora"])
    with pytest.raises(SystemExit):
        compile_cost.parse_args(["--warmup", "1"])
    assert compile_cost.parse_args(["--variants", "lora"]).variant_list == ["lora"]
