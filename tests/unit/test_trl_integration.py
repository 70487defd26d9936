"""TRL integration: ``AdaptedSFTTrainer`` runs equal ``hyperadalora train`` runs, step for step.

Reference: :class:`hyperadalora.train.run.Run` (the library's own loop: ``optimizer_step`` with
``backward_hypernetworks``, clipping, ``after_step``) on the task ``alpaca`` over verbatim rows of
``shared/data/alpaca/train.jsonl``, on a tiny Llama with a word-level tokenizer built offline.
The SFTTrainer side gets exactly the features and batches the run trains on: the same rows in the
run's seeded order (``batch_order``), tokenised by the same ``build_causal_lm_features`` (so
SFTTrainer does not tokenise, pack or mask by itself), sequential sampling, no shuffling, the same
AdamW settings at a constant learning rate, clipping at 1.0, no dropout, fp32, no activation
checkpointing. Every method x source trains 10 steps; AdaLoRA prunes during them.

Loss averaging: SFTTrainer averages the token loss over the whole optimizer step, the run averages
the micro-batch means; with gradient accumulation the comparison uses rows whose micro-batches
all have the same number of label tokens (checked), where both definitions agree.

Also: resuming from a checkpoint continues identically; 2 processes (torchrun, gloo;
tests/unit/trl_ddp_worker.py) equal 1 process with the whole batch; SFTTrainer's own
tokenisation with packing and activation checkpointing keeps the contract; refused options fail
before any work.
"""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from trl import SFTConfig

import hyperadalora as ha
from hyperadalora.data.instruct import IGNORE_INDEX, build_causal_lm_features, example_from_row
from hyperadalora.integrations.sft import AdaptedSFTTrainer
from hyperadalora.train import RunConfig
from hyperadalora.train.build import batch_order, build_model
from hyperadalora.train.run import Run
from tiny_models import LLAMA_TARGETS, tiny_llama
from launch import torchrun_two_ranks

STEPS, BATCH, LR, SEED = 10, 2, 3e-3, 3
METHODS = ["lora", "dora", "dylora", "adalora"]
SOURCES = ["direct", "hyper"]

# Verbatim rows of shared/data/alpaca/train.jsonl (lines 17, 18, 27, 48, 96, 102, 122, 130).
ALPACA_ROWS = [
    {"instruction": "List the seven colours of the rainbow.", "input": "",
     "output": "The seven colours of the rainbow are red, orange, yellow, green, blue, indigo, and violet."},
    {"instruction": "Arrange the following words alphabetically: ship, school, keep.", "input": "ship, school, keep",
     "output": "The words arranged alphabetically are keep, school, ship."},
    {"instruction": "Identify the capital of the United States.", "input": "",
     "output": "The capital of the United States is Washington D.C."},
    {"instruction": "Add two elements to make this sentence humorous.", "input": "He was about to give a speech",
     "output": "He was about to give a speech dressed as an alien with a kazoo in hand."},
    {"instruction": "Add 5 words to the following sentence to make its meaning clearer.",
     "input": "The team had finished the task.", "output": "The team had finished the task successfully and on time."},
    {"instruction": "Find the distance between two cities in miles.", "input": "Paris, France and Madrid, Spain",
     "output": "The distance between Paris, France and Madrid, Spain is 621.3 miles."},
    {"instruction": "Calculate the product of 5 and 3.", "input": "", "output": "The product of 5 and 3 is 15."},
    {"instruction": "Construct a sentence using the following words: car, cat, gift.", "input": "",
     "output": "The cat was very grateful for the car as a gift."},
]
SPECIALS = ["<pad>", "<unk>", "</s>", "<user>", "<bot>"]
CHAT_TEMPLATE = ("{% for m in messages %}<user> {{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %} <bot>{% endif %}")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")  # SFTTrainer pings the hub otherwise
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def make_tokenizer():
    """A word-level tokenizer over the rows' words (ids below the tiny Llama's 120), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for row in ALPACA_ROWS for text in row.values() for w, _ in pre.pre_tokenize_str(text)})
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    assert len(vocab) <= 120
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    backend.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def adapter(method: str, source: str, **hyper) -> dict:
    cfg = {"method": method, "source": source, "r": 4, "seed": SEED, "target_modules": LLAMA_TARGETS,
           "hyper": {"hidden": 24, "layers": 1, **hyper}}
    if method == "adalora":  # prune from 4 to 2 per module on average between steps 2 and 7 of 10
        cfg["allocator"] = {"target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 1}
    return cfg


def run_config(tmp_path, method: str, source: str, *, grad_accum: int = 1, max_length: int = 48,
               **hyper) -> RunConfig:
    data = tmp_path / "data" / "alpaca"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ALPACA_ROWS))
    (data / "test.jsonl").write_text(json.dumps(ALPACA_ROWS[0]) + "\n")
    return RunConfig(task="alpaca", model="tiny-llama", data_dir=str(tmp_path / "data"), output_dir=str(tmp_path),
                     run_name="loop", seed=SEED, steps=STEPS, batch_size=BATCH, grad_accum=grad_accum,
                     max_length=max_length, lr=LR, warmup_steps=0, min_lr_ratio=1.0, max_grad_norm=1.0,
                     eval_rows=1, max_new_tokens=2, progress=False, adapter=adapter(method, source, **hyper))


def loop_run(config: RunConfig):
    """The library's own training loop; returns ``(per-step log rows, trained model)``."""
    run = Run(config, base_model=tiny_llama(), tokenizer=make_tokenizer())
    result = run.run()
    return result.log, run.model


def sft_features(config: RunConfig) -> list[dict]:
    """The run's micro-batches, row after row, in the run's order, tokenised as the run does."""
    order = batch_order(len(ALPACA_ROWS), config.batch_size, config.seed)
    picked = [i for _ in range(config.steps * config.grad_accum) for i in next(order)]
    rows = [example_from_row(ALPACA_ROWS[i], f"row {i}") for i in picked]
    return build_causal_lm_features(rows, make_tokenizer(), config.max_length)


class Recording(AdaptedSFTTrainer):
    """Records the loss ``compute_loss`` hands to ``training_step`` (after the regulariser is added)."""

    def __init__(self, *args, **kwargs):
        self.losses: list[float] = []
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.losses.append(float((loss[0] if return_outputs else loss).detach()))
        return loss


def sft_args(tmp_path, config: RunConfig, **overrides) -> SFTConfig:
    settings = dict(
        output_dir=str(tmp_path / "sft"), max_steps=config.steps, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, learning_rate=config.lr, lr_scheduler_type="constant",
        weight_decay=0.0, optim="adamw_torch", max_grad_norm=config.max_grad_norm, max_length=config.max_length,
        train_sampling_strategy="sequential", shuffle_dataset=False, activation_checkpointing=False, bf16=False,
        use_cpu=True, report_to="none", disable_tqdm=True, logging_steps=1000, save_strategy="no", seed=config.seed)
    return SFTConfig(**{**settings, **overrides})


def sft_run(tmp_path, config: RunConfig, **overrides):
    """The same run through AdaptedSFTTrainer; returns ``(per-step losses, trained model, trainer)``."""
    model, tok, _ = build_model(config, base_model=tiny_llama(), tokenizer=make_tokenizer())
    trainer = Recording(model=model, args=sft_args(tmp_path, config, **overrides),
                        train_dataset=Dataset.from_list(sft_features(config)), processing_class=tok)
    trainer.train()
    ga = config.grad_accum  # the recorded micro-batch losses are already scaled for accumulation
    per_step = [sum(trainer.losses[s * ga:(s + 1) * ga]) for s in range(len(trainer.losses) // ga)]
    return per_step, model, trainer


def assert_same_training(loop_log, loop_model, sft_losses, sft_model, atol=1e-5):
    assert len(sft_losses) == len(loop_log) == STEPS
    torch.testing.assert_close(torch.tensor(sft_losses, dtype=torch.float64),
                               torch.tensor([row["loss"] for row in loop_log], dtype=torch.float64),
                               rtol=0, atol=atol)
    assert sft_model.steps_taken == loop_model.steps_taken == STEPS  # after_step once per optimizer step
    assert sft_model.rank_pattern == loop_model.rank_pattern
    assert sft_model.allocator.budget == loop_model.allocator.budget
    assert sft_model.dylora_rank == loop_model.dylora_rank
    for (name, p), q in zip(sft_model.named_parameters(), loop_model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=0, atol=10 * atol, msg=name)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("method", METHODS)
def test_sft_trainer_equals_the_library_loop(tmp_path, method, source):
    config = run_config(tmp_path, method, source)
    loop_log, loop_model = loop_run(config)
    sft_losses, sft_model, _ = sft_run(tmp_path, config)
    assert_same_training(loop_log, loop_model, sft_losses, sft_model)
    if method == "adalora":
        pruned = sum(not keep for pattern in sft_model.rank_pattern.values() for keep in pattern)
        assert pruned == sum(layer.r for layer in sft_model.adapted_layers.values()) - sft_model.allocator.target_bgt
        # The regulariser is far above the tolerance: counting it wrongly (or not at all) would fail the test.
        assert min(row["loss"] - row["task_loss"] for row in loop_log) > 1e-3
    if method == "dylora":
        assert len({row["total_rank"] for row in loop_log}) >= 1


def test_compaction_under_sft_equals_the_library_loop(tmp_path):
    """compact='final': the callback cuts the factors and SFTTrainer's optimizer state, as our loop does."""
    config = run_config(tmp_path, "adalora", "direct")
    allocator = dataclasses.replace(config.adapter.allocator, compact="final")
    config = dataclasses.replace(config, adapter=dataclasses.replace(config.adapter, allocator=allocator))
    loop_log, loop_model = loop_run(config)
    sft_losses, sft_model, _ = sft_run(tmp_path, config)
    assert sft_model.allocator.compacted and loop_model.allocator.compacted
    assert sum(layer.r for layer in sft_model.adapted_layers.values()) == sft_model.allocator.target_bgt
    assert_same_training(loop_log, loop_model, sft_losses, sft_model)


@pytest.mark.parametrize("generate", ["per_forward", "per_step"])
def test_gradient_accumulation_counts_the_regulariser_once_per_step(tmp_path, generate):
    """Two micro-batches per step: SFTTrainer does not divide its (step-normalised) token loss, so
    gamma * R is added at half weight per micro-batch; the hypernetworks generate per forward (every
    micro-batch goes through the adapted model) or once per step (their backward before clipping,
    which is active here). 16 tokens per row give every row 8 label tokens, so SFTTrainer's
    token-weighted average over the step equals the run's mean of micro-batch means."""
    config = run_config(tmp_path, "adalora", "hyper", grad_accum=2, max_length=16, generate=generate)
    config = config.replace(max_grad_norm=0.05)
    counts = {sum(label != IGNORE_INDEX for label in f["labels"][1:]) for f in sft_features(config)}
    assert counts == {8}, "the rows must have equal label counts for the two averages to agree"
    loop_log, loop_model = loop_run(config)
    sft_losses, sft_model, _ = sft_run(tmp_path, config)
    assert_same_training(loop_log, loop_model, sft_losses, sft_model)
    generations = STEPS * (2 if generate == "per_forward" else 1)  # every micro-batch, or once per step
    groups = {kind: sum(key[0] == kind for key in sft_model.hyper.groups) for kind in sft_model.hyper.nets}
    assert sft_model.hyper.calls_per_kind() == {kind: n * generations for kind, n in groups.items()}
    # The run's final evaluation generates once more (no-grad forward).
    assert loop_model.hyper.calls_per_kind() == {kind: n * (generations + 1) for kind, n in groups.items()}
    assert max(row["grad_norm"] for row in loop_log) > 0.05  # clipping changed the steps


def test_sft_tokenisation_and_packing_train_through_the_contract(tmp_path):
    """SFTTrainer's own data path (prompt-completion rows, completion-only loss, packing, activation
    checkpointing on by SFTConfig's default): the contract still runs once per optimizer step."""
    config = run_config(tmp_path, "adalora", "hyper")
    model, tok, _ = build_model(config, base_model=tiny_llama(), tokenizer=make_tokenizer())
    rows = [{"prompt": tok.apply_chat_template([{"role": "user", "content": r["instruction"]}], tokenize=False,
                                              add_generation_prompt=True), "completion": " " + r["output"]}
            for r in ALPACA_ROWS * 3]
    before = [p.detach().clone() for p in model.hypernetwork_parameters()]
    args = sft_args(tmp_path, config, packing=True, activation_checkpointing=None, max_steps=4)  # SFTConfig's: on
    trainer = Recording(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert trainer.completion_only_loss and trainer.padding_free and args.activation_checkpointing
    trainer.train()
    assert model.steps_taken == 4 and model.allocator.steps_seen == 4
    assert all(torch.isfinite(torch.tensor(trainer.losses)))
    assert sum(not torch.equal(p, q) for p, q in zip(model.hypernetwork_parameters(), before)) > len(before) // 2
    assert sum(model.ranks.values()) < sum(layer.r for layer in model.adapted_layers.values())  # pruning started


@pytest.mark.parametrize("change,message", [
    ({"peft_config": "lora"}, "peft_config was given together with a model hyperadalora already adapted"),
    ({"args": {"label_smoothing_factor": 0.1}}, "label_smoothing_factor > 0 is not supported"),
    ({"args": {"use_liger_kernel": True}}, "use_liger_kernel=True is not supported"),
    ({"args": {"chat_template_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}}, "would clone another model's chat"),
    ({"compute_loss_func": lambda *a, **k: 0}, "compute_loss_func is not supported"),
    ({"target": "lm_head"}, "an adapter on the LM head is not supported"),
])
def test_refused_options_fail_before_any_work(tmp_path, change, message):
    from peft import LoraConfig

    config = run_config(tmp_path, "lora", "direct")
    targets = [*LLAMA_TARGETS, "lm_head"] if change.get("target") else LLAMA_TARGETS
    model = ha.wrap(tiny_llama(), ha.AdapterConfig(method="lora", r=4, target_modules=targets))
    kwargs = {k: v for k, v in change.items() if k not in ("args", "target", "peft_config")}
    if "peft_config" in change:
        kwargs["peft_config"] = LoraConfig(r=4, target_modules=["q_proj"])
    args = sft_args(tmp_path, config, **change.get("args", {}))
    rows = Dataset.from_list(sft_features(config)[:4])
    with pytest.raises(ValueError, match=message):
        AdaptedSFTTrainer(model=model, args=args, train_dataset=rows, processing_class=make_tokenizer(), **kwargs)
    assert not (tmp_path / "sft").exists()  # nothing written
    assert "forward" not in model.__dict__  # SFTTrainer never got to patch the model


@pytest.mark.parametrize("model", ["HuggingFaceTB/SmolLM2-135M-Instruct", "bare"])
def test_a_model_not_made_by_wrap_is_refused(tmp_path, model):
    config = run_config(tmp_path, "lora", "direct")
    model = tiny_llama() if model == "bare" else model
    with pytest.raises(TypeError, match="hyperadalora.wrap"):
        AdaptedSFTTrainer(model=model, args=sft_args(tmp_path, config),
                          train_dataset=Dataset.from_list(sft_features(config)[:4]), processing_class=make_tokenizer())


def test_checkpoint_resume_continues_identically(tmp_path):
    """Checkpoint at step 4 of 10 (mid-pruning), resume a model with another initialisation from it:
    steps 5-10 give the losses, masks and allocator state of the uninterrupted run."""
    from hyperadalora.integrations.trainer import ADAPTER_SUBDIR

    config = run_config(tmp_path, "adalora", "hyper")
    full_losses, full_model, _ = sft_run(tmp_path, config, save_strategy="steps", save_steps=4)
    checkpoint = tmp_path / "sft" / "checkpoint-4"
    assert (checkpoint / ADAPTER_SUBDIR / "allocator_state.json").is_file()
    other = config.replace(adapter={**config.adapter.to_dict(), "seed": 99})
    model, tok, _ = build_model(other, base_model=tiny_llama(), tokenizer=make_tokenizer())
    resumed = Recording(model=model, args=sft_args(tmp_path, config, save_strategy="steps", save_steps=4),
                        train_dataset=Dataset.from_list(sft_features(config)), processing_class=tok)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(torch.tensor(resumed.losses, dtype=torch.float64),
                               torch.tensor(full_losses[4:], dtype=torch.float64), rtol=0, atol=1e-6)
    assert model.rank_pattern == full_model.rank_pattern
    a, b = model.allocator, full_model.allocator
    assert (a.budget, a.steps_seen, a.last_step) == (b.budget, b.steps_seen, b.last_step)


def test_two_processes_count_the_regulariser_once(tmp_path):
    """torchrun, 2 ranks (gloo): SFTTrainer multiplies each rank's token loss by the number of
    processes before DDP averages; gamma * R must not be, so 2 ranks x 1 row equal 1 process x 2 rows
    (losses, pruning, parameters), and the ranks stay identical (hypernetwork dL/dF averaged)."""
    torchrun_two_ranks([str(Path(__file__).resolve().parent / "trl_ddp_worker.py"), str(tmp_path / "ddp")])
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["checksums"] == ranks[1]["checksums"], "the ranks diverged"

    config = run_config(tmp_path, "adalora", "hyper")
    losses, model, _ = sft_run(tmp_path, config)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for r, res in enumerate(ranks):
        torch.testing.assert_close(torch.tensor(res["losses"], dtype=torch.float64),
                                   torch.tensor(losses, dtype=torch.float64), rtol=0, atol=1e-5)
        assert res["rank_pattern"] == model.rank_pattern and res["budget"] == model.allocator.budget
        assert res["steps_taken"] == STEPS
        saved = load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors"))
        assert saved.keys() == params.keys()
        for name, p in params.items():
            torch.testing.assert_close(saved[name], p, rtol=0, atol=1e-5, msg=name)
