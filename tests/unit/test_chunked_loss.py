"""The chunked causal-LM loss (``loss_chunk_tokens``) equals the model's own, without whole logits.

Reference: transformers' own forward (``ForCausalLMLoss`` on the full logits) of an identical
adapted tiny Llama. Loss and every gradient must agree within 1e-6 for every method x source,
with padding and prompt positions masked (-100), for chunk sizes that do and do not divide the
token count, and with activation checkpointing on; the output projection must never see more
than one chunk of positions.
"""

from __future__ import annotations

import pytest
import torch

import hyperadalora as ha
from hyperadalora.chunked_loss import chunked_lm_loss
from hyperadalora.methods import METHOD_REGISTRY
from hyperadalora.train.build import enable_activation_checkpointing
from tiny_models import LLAMA_TARGETS, llama_batch, tiny_bert, tiny_llama

STEPS = 2


def masked_batch(seed: int) -> dict[str, torch.Tensor]:
    """A Llama batch whose first row is right-padded and whose prompt positions take no loss."""
    batch = llama_batch(seed, batch=3, seq=10)
    batch["attention_mask"][0, 7:] = 0
    batch["labels"][0, 7:] = -100  # padding
    batch["labels"][:, :3] = -100  # the prompt
    return batch


def build(method: str, source: str, chunk: int, checkpointing: bool = False) -> ha.AdaptedModel:
    alloc = {"allocator": ha.AllocatorConfig(total_step=STEPS, target_r=2, tinit=0, tfinal=1, deltaT=1)} \
        if method == "adalora" else {}
    cfg = ha.AdapterConfig(method=method, source=source, r=4, lora_alpha=8.0, seed=3, target_modules=LLAMA_TARGETS,
                           hyper=ha.HyperConfig(hidden=24, layers=1), **alloc)
    model = ha.wrap(tiny_llama(), cfg)
    if checkpointing:
        enable_activation_checkpointing(model.model)
    model.enable_chunked_loss(chunk)
    return model.train()


def step_gradients(model: ha.AdaptedModel, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model(**batch).loss
    loss.backward()
    model.backward_hypernetworks()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("source", ["direct", "hyper"])
@pytest.mark.parametrize("method", list(METHOD_REGISTRY))
def test_chunked_loss_gives_the_models_own_loss_and_gradients(method, source):
    plain, chunked = build(method, source, 0), build(method, source, 7)  # 30 positions: chunks 7, 7, 7, 7, 2
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (plain, chunked)]
    for step in range(STEPS):
        (loss_a, grads_a), (loss_b, grads_b) = (step_gradients(m, masked_batch(step)) for m in (plain, chunked))
        assert loss_b == pytest.approx(loss_a, abs=1e-6)
        assert grads_a.keys() == grads_b.keys() and grads_a
        for name, g in grads_a.items():
            torch.testing.assert_close(grads_b[name], g, rtol=1e-6, atol=1e-6, msg=f"{name} at step {step}")
        for m, opt in zip((plain, chunked), opts):
            opt.step()
            m.after_step(step)
            opt.zero_grad()


@pytest.mark.parametrize("chunk", [1, 16, 64])
def test_the_output_projection_never_sees_more_than_a_chunk_also_under_checkpointing(chunk):
    plain, chunked = build("adalora", "hyper", 0), build("adalora", "hyper", chunk, checkpointing=True)
    rows = []
    chunked.model.lm_head.register_forward_hook(lambda _m, _i, out: rows.append(out.shape[0]))
    batch = masked_batch(5)
    (loss_a, grads_a), (loss_b, grads_b) = step_gradients(plain, batch), step_gradients(chunked, batch)
    assert loss_b == pytest.approx(loss_a, abs=1e-6)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-6, atol=1e-6, msg=name)
    assert max(rows) <= chunk, "the whole logits were formed"
    # Every chunk with a label is projected twice (forward, then recomputed in the backward); position
    # t of a row predicts its token t + 1, so the last position of each row and the masked ones take no loss.
    nxt = torch.cat([batch["labels"][:, 1:], torch.full((3, 1), -100)], dim=1).reshape(-1)
    counted = {i // chunk for i in range(nxt.numel()) if nxt[i] != -100}
    assert len(rows) == 2 * len(counted)


def test_chunked_lm_loss_matches_a_hand_computed_mean_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 11, bias=False)
    hidden = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, -100, 4], [5, -100, 7, 8]])
    # Shifted pairs (position -> next label): row 0: 0->2, 2->4 (1->-100 skipped, 3-> end); row 1: 1->7, 2->8.
    pairs = [(0, 0, 2), (0, 2, 4), (1, 1, 7), (1, 2, 8)]
    logp = torch.log_softmax(head(hidden), dim=-1)
    expected = -sum(logp[b, t, y] for b, t, y in pairs) / len(pairs)
    for chunk in (1, 3, 8, 100):
        assert float(chunked_lm_loss(head, hidden, labels, chunk)) == pytest.approx(float(expected), abs=1e-6)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_lm_loss(head, hidden, labels, 0)


def test_a_model_without_vocabulary_logits_and_a_classification_run_are_refused():
    from hyperadalora.train import RunConfig

    model = ha.wrap(tiny_bert(), ha.AdapterConfig(method="lora", r=2, target_modules=["query", "value"]))
    with pytest.raises(ValueError, match="causal language model"):
        model.enable_chunked_loss(64)
    assert model.loss_chunk_tokens == 0
    with pytest.raises(ValueError, match=">= 0"):
        model.enable_chunked_loss(-1)
    with pytest.raises(ValueError, match="causal-LM tasks"):
        RunConfig(task="sst2", loss_chunk_tokens=256)
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        RunConfig(task="alpaca", loss_chunk_tokens=-5)


def test_run_config_turns_on_the_chunked_loss():
    from hyperadalora.train import RunConfig, build_model

    config = RunConfig(task="alpaca", model="tiny", steps=2, loss_chunk_tokens=32,
                       adapter={"method": "lora", "r": 4, "target_modules": LLAMA_TARGETS})
    model, _, _ = build_model(config, base_model=tiny_llama(), tokenizer=None)
    assert model.loss_chunk_tokens == 32
    out = model.train()(**llama_batch(0))
    assert out.logits is None and out.loss.requires_grad


def test_a_run_with_the_chunked_loss_logs_the_same_losses_and_saves_the_same_adapter(tmp_path_factory):
    from safetensors.torch import load_file

    from hyperadalora.train import load_run_config, train
    from test_train_loop import read_jsonl, tiny_llama_dir, write_instruct, write_rte

    root = tmp_path_factory.mktemp("chunked-run")
    llama, data = tiny_llama_dir(root), write_instruct(write_rte(root / "data"))
    runs = {}
    for chunk in (0, 5):
        cfg = load_run_config("alpaca_smollm2_hyperadalora", [
            f"model={llama}", f"data_dir={data}", f"output_dir={root}", f"run_name=chunk{chunk}", "steps=3",
            "batch_size=2", "max_length=64", "eval_every=0", "eval_rows=1", "max_new_tokens=2", "progress=false",
            "adapter.target_modules=[q_proj,v_proj]", f"loss_chunk_tokens={chunk}"])
        runs[chunk] = train(cfg).run_dir
    logs = [[row["loss"] for row in read_jsonl(runs[c] / "log.jsonl")] for c in (0, 5)]
    assert len(logs[0]) == 3 and logs[1] == pytest.approx(logs[0], abs=1e-6)
    adapters = [load_file(runs[c] / "adapter" / "adapter_model.safetensors") for c in (0, 5)]
    assert adapters[0].keys() == adapters[1].keys()
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
