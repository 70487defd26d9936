"""Hugging Face Trainer integration: Trainer runs equal the plain training-contract loop, step for step.

Fixed data, sequential sampling, constant learning rate, no dropout (tiny_bert), AdamW with the
same settings on both sides; AdaLoRA budgets prune during the run (tinit=1, tfinal=2 of 8 steps).
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import Trainer, TrainingArguments

import hyperadalora as ha
from hyperadalora.integrations.trainer import ADAPTER_SUBDIR, AdaptedModelCallback, AdaptedTrainer
from tiny_models import BERT_TARGETS, bert_batch, tiny_bert

STEPS, BATCH, LR = 8, 4, 3e-3
SMALL_HYPER = dict(hidden=24, layers=1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one intra-op thread (many times faster on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(source: str = "direct", **hyper) -> ha.AdapterConfig:
    return ha.AdapterConfig(
        method="adalora", source=source, r=4, seed=7, gamma=0.1, target_modules=BERT_TARGETS,
        modules_to_save=("classifier",), hyper=ha.HyperConfig(**{**SMALL_HYPER, **hyper}),
        allocator=ha.AllocatorConfig(total_step=STEPS, target_r=2, tinit=1, tfinal=2, deltaT=1))


def dataset(n: int = STEPS * BATCH * 2) -> list[dict[str, torch.Tensor]]:
    b = bert_batch(11, batch=n)
    return [{k: v[i] for k, v in b.items()} for i in range(n)]


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def plain_loop(model, data, steps=STEPS, ga=1, max_grad_norm=0.0, start=0, reg_weight_per_micro=None):
    """The training contract of DESIGN.md section 4, written out; returns the per-micro-batch losses."""
    opt = torch.optim.AdamW(model.optimizer_param_groups(LR, 0.0), lr=LR)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses = []
    for step in range(start, steps):
        for micro in range(ga):
            i = step * ga + micro
            out = model(**collate(data[i * BATCH:(i + 1) * BATCH]))
            loss = out.loss / ga
            if reg_weight_per_micro is not None:  # Trainer's loss-kwargs path: no division, R once per step
                reg = model.adapter_config.gamma * model.orthogonality_regularizer()
                loss = out.loss - (1 - reg_weight_per_micro) * reg
            loss.backward()
            losses.append(out.loss.item())
        model.backward_hypernetworks()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        opt.step()
        model.after_step(step)
        model.compact(opt)  # a no-op unless AllocatorConfig.compact='final'
        opt.zero_grad(set_to_none=True)
    return losses


class Recorder:
    """Records every micro-batch loss the Trainer computes (before Trainer divides it)."""

    def __init__(self, *args, **kwargs):
        self.losses: list[float] = []
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.losses.append(float((out[0] if return_outputs else out).detach()))
        return out


class RecordingAdaptedTrainer(Recorder, AdaptedTrainer):
    pass


class RecordingTrainer(Recorder, Trainer):
    pass


def training_args(out_dir, steps=STEPS, ga=1, max_grad_norm=0.0, save_steps=None, **kw) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ga,
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, optim="adamw_torch",
        max_grad_norm=max_grad_norm, train_sampling_strategy="sequential", report_to="none", use_cpu=True,
        disable_tqdm=True, logging_steps=1000, save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, seed=0, **kw)


def twins(cfg):
    # Two wraps, not a deepcopy: a deep-copied hyper model's layers still read the original's
    # generated factors. tiny_bert() reseeds, so both hypernetworks start identical.
    return ha.wrap(tiny_bert(), cfg), ha.wrap(tiny_bert(), cfg)


def assert_same_run(trainer_losses, loop_losses, a, b):
    assert len(trainer_losses) == len(loop_losses)
    torch.testing.assert_close(torch.tensor(trainer_losses, dtype=torch.float64),
                               torch.tensor(loop_losses, dtype=torch.float64), rtol=0, atol=1e-6)
    assert a.rank_pattern == b.rank_pattern
    assert a.allocator.budget == b.allocator.budget


@pytest.mark.parametrize("source", ["direct", "hyper"])
def test_adapted_trainer_equals_plain_loop(tmp_path, source):
    ours, ref = twins(config(source))
    data = dataset()
    trainer = RecordingAdaptedTrainer(model=ours, args=training_args(tmp_path, max_grad_norm=1.0), train_dataset=data)
    trainer.train()
    loop = plain_loop(ref, data, max_grad_norm=1.0)
    assert_same_run(trainer.losses, loop, ours, ref)
    pruned = sum(not keep for pattern in ours.rank_pattern.values() for keep in pattern)
    assert pruned == sum(layer.r for layer in ours.adapted_layers.values()) - ours.allocator.target_bgt > 0
    assert ours.allocator.steps_seen == STEPS  # after_step once per optimizer step


def compacting(source: str = "direct") -> ha.AdapterConfig:
    cfg = config(source, **({"arch": "mlp", "context": False} if source == "hyper" else {}))
    return ha.AdapterConfig.from_dict({**cfg.to_dict(), "allocator": {**cfg.allocator.to_dict(), "compact": "final"}})


@pytest.mark.parametrize("source", ["direct", "hyper"])
def test_adapted_trainer_compacts_like_plain_loop(tmp_path, source):
    """compact='final' under Trainer: the factors and Trainer's optimizer state are cut once the budget is final."""
    ours, ref = twins(compacting(source))
    data = dataset()
    trainer = RecordingAdaptedTrainer(model=ours, args=training_args(tmp_path, max_grad_norm=1.0), train_dataset=data)
    trainer.train()
    assert_same_run(trainer.losses, plain_loop(ref, data, max_grad_norm=1.0), ours, ref)
    assert ours.allocator.compacted and ref.allocator.compacted
    kept = ours.ranks
    assert {n: layer.r for n, layer in ours.adapted_layers.items()} == kept and sum(kept.values()) < 4 * len(kept)
    state = trainer.optimizer.state
    for name, layer in ours.adapted_layers.items():
        if source == "direct":  # the optimizer state of a direct factor is cut with it
            assert state[layer.factors["lam"]]["exp_avg"].shape == (kept[name],)


def test_adapted_trainer_resumes_a_compacted_run(tmp_path):
    cfg = compacting()
    data = dataset()
    full_model = ha.wrap(tiny_bert(), cfg)
    full = RecordingAdaptedTrainer(model=full_model, args=training_args(tmp_path / "a", save_steps=STEPS - 1),
                                   train_dataset=data)
    full.train()
    ckpt = tmp_path / "a" / f"checkpoint-{STEPS - 1}"
    assert full_model.allocator.compacted
    resumed_model = ha.wrap(tiny_bert(), ha.AdapterConfig.from_dict({**cfg.to_dict(), "seed": 99}))
    resumed = RecordingAdaptedTrainer(model=resumed_model, args=training_args(tmp_path / "a", save_steps=STEPS - 1),
                                      train_dataset=data)
    resumed.train(resume_from_checkpoint=str(ckpt))
    torch.testing.assert_close(torch.tensor(resumed.losses, dtype=torch.float64),
                               torch.tensor(full.losses[STEPS - 1:], dtype=torch.float64), rtol=0, atol=1e-6)
    assert resumed_model.ranks == full_model.ranks and resumed_model.allocator.compacted


def test_plain_trainer_with_callback_equals_plain_loop(tmp_path):
    ours, ref = twins(config("direct"))
    data = dataset()
    args = training_args(tmp_path, max_grad_norm=1.0, remove_unused_columns=False)
    trainer = RecordingTrainer(model=ours, args=args, train_dataset=data, callbacks=[AdaptedModelCallback()])
    trainer.train()
    assert_same_run(trainer.losses, plain_loop(ref, data, max_grad_norm=1.0), ours, ref)


def test_per_step_hyper_with_accumulation_and_clipping(tmp_path):
    """backward_hypernetworks() runs after the last micro-batch and before clipping (clipping active)."""
    ours, ref = twins(config("hyper", generate="per_step"))
    data = dataset()
    trainer = RecordingAdaptedTrainer(model=ours, args=training_args(tmp_path, steps=6, ga=2, max_grad_norm=0.05),
                                      train_dataset=data)
    trainer.model_accepts_loss_kwargs = False  # Trainer then divides each micro-batch loss by 2, as the loop does
    trainer.train()
    assert_same_run(trainer.losses, plain_loop(ref, data, steps=6, ga=2, max_grad_norm=0.05), ours, ref)
    assert ours.hyper.calls_per_kind()["P"] == ref.hyper.calls_per_kind()["P"]


def test_regulariser_counted_once_per_step_when_loss_is_not_divided(tmp_path):
    """With loss kwargs (Trainer's default for BERT) Trainer sums micro-batch losses undivided;
    AdaptedTrainer still weights gamma * R once per optimizer step."""
    ours, ref = twins(config("direct"))
    data = dataset()
    trainer = RecordingAdaptedTrainer(model=ours, args=training_args(tmp_path, steps=4, ga=2), train_dataset=data)
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    loop = plain_loop(ref, data, steps=4, ga=2, reg_weight_per_micro=0.5)
    # The recorded Trainer loss already carries the correction; compare the runs through the model state.
    assert len(trainer.losses) == len(loop)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert ours.rank_pattern == ref.rank_pattern


def test_plain_trainer_refuses_per_step_with_clipping(tmp_path):
    model = ha.wrap(tiny_bert(), config("hyper", generate="per_step"))
    args = training_args(tmp_path, steps=2, max_grad_norm=1.0, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[AdaptedModelCallback()])
    with pytest.raises(RuntimeError, match="AdaptedTrainer"):
        trainer.train()


def test_hyper_lr_gets_its_own_param_group(tmp_path):
    model = ha.wrap(tiny_bert(), config("hyper", lr=1e-4))
    trainer = AdaptedTrainer(model=model, args=training_args(tmp_path, steps=1), train_dataset=dataset())
    opt = trainer.create_optimizer()
    hyper_ids = {id(p) for p in model.hypernetwork_parameters()}
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= hyper_ids or not ids & hyper_ids, "a group mixes hypernetwork and other parameters"
        assert group["lr"] == (1e-4 if ids <= hyper_ids else LR)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kind,source", [("adapted", "direct"), ("adapted", "hyper"), ("plain", "direct")])
def test_checkpoint_resume_continues_identically(tmp_path, kind, source):
    """Save at step 4 of 8 (in the middle of the pruning phase), resume a fresh model from it: steps
    5-8 give the same losses, masks and allocator state as the uninterrupted run."""
    cfg = config(source)
    data = dataset()
    extra = {} if kind == "adapted" else {"remove_unused_columns": False}
    make = RecordingAdaptedTrainer if kind == "adapted" else RecordingTrainer
    cbs = None if kind == "adapted" else [AdaptedModelCallback()]

    full_model = ha.wrap(tiny_bert(), cfg)
    full = make(model=full_model, args=training_args(tmp_path / "a", save_steps=4, **extra), train_dataset=data,
                callbacks=cbs)
    full.train()
    ckpt = tmp_path / "a" / "checkpoint-4"
    assert (ckpt / ADAPTER_SUBDIR / "allocator_state.json").is_file()

    # Another adapter initialisation: the adapter must come from the checkpoint.
    resumed_model = ha.wrap(tiny_bert(), ha.AdapterConfig.from_dict({**cfg.to_dict(), "seed": 99}))
    resumed = make(model=resumed_model, args=training_args(tmp_path / "a", save_steps=4, **extra),
                   train_dataset=data, callbacks=[AdaptedModelCallback()] if cbs else None)
    resumed.train(resume_from_checkpoint=str(ckpt))
    torch.testing.assert_close(torch.tensor(resumed.losses, dtype=torch.float64),
                               torch.tensor(full.losses[4:], dtype=torch.float64), rtol=0, atol=1e-6)
    assert resumed_model.rank_pattern == full_model.rank_pattern
    a, b = resumed_model.allocator, full_model.allocator
    assert (a.budget, a.steps_seen, a.last_step) == (b.budget, b.steps_seen, b.last_step)
    for key, t in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[key], t, rtol=0, atol=1e-6)


def test_checkpoint_adapter_loads_with_load_adapter(tmp_path):
    model = ha.wrap(tiny_bert(), config("direct"))
    trainer = AdaptedTrainer(model=model, args=training_args(tmp_path, steps=4, save_steps=4), train_dataset=dataset())
    trainer.train()
    folder = tmp_path / "checkpoint-4"
    assert not (folder / "model.safetensors").exists(), "AdaptedTrainer saves the adapter, not the frozen base"
    loaded = ha.load_adapter(tiny_bert(), folder / ADAPTER_SUBDIR)
    model.eval()
    loaded.eval()
    batch = bert_batch(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
    assert loaded.rank_pattern == model.rank_pattern


def test_resume_without_adapter_folder_fails_loudly(tmp_path):
    model = ha.wrap(tiny_bert(), config("direct"))
    args = training_args(tmp_path, steps=4, save_steps=2, remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=dataset()).train()  # no callback: no adapter folder
    again = Trainer(model=ha.wrap(tiny_bert(), config("direct")), args=args, train_dataset=dataset(),
                    callbacks=[AdaptedModelCallback()])
    with pytest.raises(RuntimeError, match="allocator state"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert os.path.isdir(tmp_path / "checkpoint-2")


def test_adapted_trainer_checkpoints_a_tied_causal_lm_with_dylora(tmp_path):
    """Adapter-only checkpoints work where Trainer's full state-dict save cannot (tied embeddings),
    and after_step drives DyLoRA's rank sampling once per optimizer step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import LLAMA_TARGETS, llama_batch

    def base():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=40, tie_word_embeddings=True))

    cfg = ha.AdapterConfig(method="dylora", r=4, seed=3, target_modules=LLAMA_TARGETS)
    model = ha.wrap(base(), cfg)
    b = llama_batch(0, batch=16)
    rows = [{k: v[i] for k, v in b.items()} for i in range(16)]
    sampled = []

    class Watch(AdaptedModelCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sampled.append(model.dylora_rank)

    args = training_args(tmp_path, steps=4, save_steps=2)
    trainer = AdaptedTrainer(model=model, args=args, train_dataset=rows, callbacks=[Watch(save_adapter=False)])
    trainer.train()
    assert len(sampled) == 4 and model.steps_taken == 4
    loaded = ha.load_adapter(base(), tmp_path / "checkpoint-4" / ADAPTER_SUBDIR)
    for (n, p), q in zip(model.named_parameters(), loaded.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, msg=n)
