"""Multi-task hypernetworks: task embeddings (HyperConfig.task_embeddings), ``hyperadalora multitask``,
and a new task started from them (init_from: the mean of the source tasks' embeddings).

References: the same network with the embedding rows made equal (the generated factors must then
not depend on the task), a wrap without task embeddings (every other parameter identical), the
saved adapter (round trip), and the source network generating with the mean embedding by hand.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hyperadalora as ha
from hyperadalora.checkpoint import load_adapter
from hyperadalora.cli import main
from hyperadalora.train import load_run_config
from hyperadalora.train.multitask import check_tasks
from test_train_loop import tiny_bert_dir, write_rte
from tiny_models import BERT_TARGETS, tiny_bert, train_steps


def config(tasks: int = 2, **kw) -> ha.AdapterConfig:
    alloc = ha.AllocatorConfig(total_step=8, target_r=2, tinit=1, tfinal=2, deltaT=1)
    return ha.AdapterConfig(method="adalora", source="hyper", r=4, lora_alpha=8, seed=3, target_modules=BERT_TARGETS,
                            modules_to_save=("classifier",), allocator=alloc,
                            hyper=ha.HyperConfig(hidden=16, task_embeddings=tasks), **kw)


def factors(model) -> dict[str, dict[str, torch.Tensor]]:
    model.eval()
    with torch.no_grad():
        return {n: {k: v.detach().clone() for k, v in layer.get_factors().items()}
                for n, layer in model.adapted_layers.items()}


def max_difference(a, b) -> float:
    return max(float((a[n][k] - b[n][k]).abs().max()) for n in a for k in a[n])


def trained(tasks: int = 2):
    model = ha.wrap(tiny_bert(), config(tasks))
    for step in range(6):  # round robin, as the multi-task loop does
        model.set_task(step % tasks)
        train_steps(model, 1, start=step)
    return model


def test_the_generated_factors_depend_on_the_task_only_through_its_embedding():
    model = trained()
    model.set_task(0)
    first = factors(model)
    model.set_task(1)
    second = factors(model)
    assert max_difference(first, second) > 1e-4  # trained embeddings differ: so do the adapters
    with torch.no_grad():
        for net in model.source.nets.values():
            net.task_emb[1].copy_(net.task_emb[0])
    model.source.invalidate()
    assert max_difference(first, factors(model)) == 0.0  # equal embeddings: the same adapter


def test_without_task_embeddings_the_network_is_initialised_as_before():
    plain = ha.wrap(tiny_bert(), config(tasks=0))
    embedded = ha.wrap(tiny_bert(), config(tasks=3))
    theirs = dict(embedded.source.named_parameters())
    for name, p in plain.source.named_parameters():
        torch.testing.assert_close(theirs[name], p, rtol=0, atol=0)
    assert sorted(set(theirs) - set(dict(plain.source.named_parameters()))) == \
        sorted(f"nets.{kind}.task_emb" for kind in embedded.source.nets)
    assert all(t.shape == (3, 16) for n, t in theirs.items() if n.endswith("task_emb"))


@pytest.mark.parametrize("make, index, message", [
    (lambda: ha.wrap(tiny_bert(), config(tasks=2)), 2, r"use a task index from 0 to 1"),
    (lambda: ha.wrap(tiny_bert(), config(tasks=0)), 0, r"task_embeddings=0; set it to the number of tasks"),
    (lambda: ha.wrap(tiny_bert(), dataclasses.replace(config(), source="direct")), 0, r"needs adapter.source='hyper'"),
])
def test_set_task_refuses_what_has_no_embedding(make, index, message):
    with pytest.raises(ValueError, match=message):
        make().set_task(index)


def test_a_new_task_starts_at_the_mean_of_the_source_tasks(tmp_path):
    source = trained()
    source.save_adapter(str(tmp_path / "multi"))
    started = ha.wrap(tiny_bert(), config(tasks=1, init_from=str(tmp_path / "multi")))
    reference = load_adapter(tiny_bert(), tmp_path / "multi")  # the source, round-tripped
    with torch.no_grad():
        for kind, net in reference.source.nets.items():
            mean = net.task_emb.mean(dim=0)
            torch.testing.assert_close(started.source.nets[kind].task_emb[0], mean, rtol=0, atol=1e-7)
            net.task_emb[0].copy_(mean)  # by hand: the source generating with the mean embedding
    reference.set_task(0)
    reference.source.invalidate()
    assert max_difference(factors(reference), factors(started)) <= 1e-6
    with pytest.raises(ValueError, match=r"trained with 2 task embeddings .* set adapter.hyper.task_embeddings=1"):
        ha.wrap(tiny_bert(), config(tasks=0, init_from=str(tmp_path / "multi")))


def test_check_tasks_names_what_cannot_share_one_head():
    run = load_run_config("rte_minilm_hyperadalora")
    assert check_tasks(run, ["rte", "wnli", "sst2"]) == ("rte", "wnli", "sst2")
    lora = load_run_config("sst2_minilm_lora", {"adapter.source": "hyper"})  # a method without an allocator
    assert lora.adapter.allocator is None and check_tasks(lora, ["sst2", "cola"]) == ("sst2", "cola")
    with pytest.raises(ValueError, match=r"at least two distinct tasks"):
        check_tasks(run, ["rte", "rte"])
    with pytest.raises(ValueError, match=r"alpaca needs a causal-lm head .* one kind and number of labels"):
        check_tasks(run, ["rte", "alpaca"])
    with pytest.raises(ValueError, match=r"set adapter.source=hyper"):
        check_tasks(load_run_config("rte_minilm_adalora"), ["rte", "wnli"])
    with pytest.raises(ValueError, match=r"humaneval\'\] are not trainable"):
        check_tasks(run, ["rte", "humaneval"])


def write_wnli(root: Path) -> Path:
    """``wnli/`` from the tiny RTE rows (WNLI's labels are 0 / 1)."""
    (root / "wnli").mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        lines = (root / "rte" / f"{split}.tsv").read_text().splitlines()
        rows = [line.rsplit("\t", 1) for line in lines[1:]]
        (root / "wnli" / f"{split}.tsv").write_text(
            "\n".join([lines[0]] + [f"{a}\t{int(b == 'entailment')}" for a, b in rows]) + "\n")
    return root


def test_the_command_trains_round_robin_and_saves_one_adapter_for_every_task(tmp_path, capsys):
    data = write_wnli(write_rte(tmp_path / "data", train_rows=16))
    bert = tiny_bert_dir(tmp_path)
    code = main(["multitask", "rte_minilm_hyperadalora", "--tasks", "rte,wnli", "--data-dir", str(data),
                 "--output-dir", str(tmp_path / "out"), "--no-progress", f"model={bert}", "run_name=m", "steps=6",
                 "batch_size=4", "adapter.target_modules=[query,value]", "adapter.hyper.hidden=16"])
    assert code == 0
    run = tmp_path / "out" / "m"
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["task"] for r in log] == ["rte", "wnli"] * 3 and log[-1]["total_rank"] < log[0]["total_rank"]
    assert json.loads((run / "tasks.json").read_text())["tasks"] == ["rte", "wnli"]
    assert set(printed["metrics"]) == {"rte", "wnli"}
    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    tables = {k: v.shape for k, v in saved.items() if k.endswith("task_emb")}
    assert tables and all(shape == (2, 16) for shape in tables.values())
    # The saved adapter is the trained one: it reproduces each task's logged accuracy.
    from hyperadalora.models import load_model

    base, tok = load_model(str(bert), num_labels=2)
    model = load_adapter(base, run / "adapter")
    rows = [line.split("\t") for line in (data / "wnli" / "dev.tsv").read_text().splitlines()[1:]]
    batch = tok([r[1] for r in rows], [r[2] for r in rows], padding=True, return_tensors="pt")
    model.set_task(1)
    model.eval()
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1)
    accuracy = float((predicted == torch.tensor([int(r[3]) for r in rows])).float().mean())
    assert accuracy == pytest.approx(printed["metrics"]["wnli"]["accuracy"])
