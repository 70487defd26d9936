"""The training loop end to end on tiny models saved as local HF folders, with tiny data files.

The helpers here (tiny model folders with a word-level tokenizer, tiny GLUE / instruction /
HumanEval files) are also used by ``test_cli_main.py``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from hyperadalora import load_adapter
from hyperadalora.data.glue import read_glue
from hyperadalora.eval.metrics import glue_metrics
from hyperadalora.models import load_model
from hyperadalora.train import NonFiniteLossError, evaluate_run, load_run, load_run_config, train

WORDS = ("the a an is was it this that not very good bad great awful movie film fun boring cat dog sat on mat "
         "below instruction describes task paired with input provides further context write response "
         "appropriately completes request add two numbers answer what sum of and return def x y").split()
PUNCT = list("#:.,'!?()=+-*/\"_[]")
LETTERS = list("abcdefghijklmnopqrstuvwxyz0123456789")


def _tokenizer(folder: Path, causal: bool):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + PUNCT + LETTERS + [f"##{c}" for c in LETTERS]
    vocab = list(dict.fromkeys(vocab))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    kwargs = {"eos_token": "[SEP]"} if causal else {}
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True, **kwargs), len(vocab)


def tiny_bert_dir(root: Path) -> Path:
    """A 2-layer BERT classifier (no dropout) and a word-level tokenizer, saved as an HF folder."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = root / "tiny-bert"
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True)
    tok, n = _tokenizer(folder, causal=False)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=256, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_llama_dir(root: Path) -> Path:
    """A 2-layer Llama causal LM (GQA) and a word-level tokenizer with an EOS token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = root / "tiny-llama"
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True)
    tok, n = _tokenizer(folder, causal=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=40, max_position_embeddings=512, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


RTE_TRAIN = [("the movie was good", "it was good", "entailment"),
             ("the cat sat on the mat", "a dog sat", "not_entailment"),
             ("this film is fun", "it is fun", "entailment"),
             ("the dog was bad", "the dog was great", "not_entailment")]
RTE_DEV = [("a good film", "it is good", "entailment"), ("an awful movie", "it was great", "not_entailment"),
           ("the cat is fun", "the cat is fun", "entailment"), ("this is boring", "this is fun", "not_entailment"),
           ("the mat", "a mat", "entailment")]


def write_rte(root: Path, train_rows: int = 16) -> Path:
    """``root/rte/{train,dev}.tsv`` in GLUE's format (header, index, two sentences, label)."""
    (root / "rte").mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", (RTE_TRAIN * 8)[:train_rows]), ("dev", RTE_DEV)):
        lines = ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\t{a}\t{b}\t{lab}" for i, (a, b, lab) in enumerate(rows)]
        (root / "rte" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def write_instruct(root: Path) -> Path:
    """``alpaca/`` and ``gsm8k/`` train / test JSONL files, and a 2-problem ``humaneval/``."""
    for name in ("alpaca", "gsm8k"):
        (root / name).mkdir(parents=True, exist_ok=True)
    alpaca = [{"instruction": "write a good answer", "input": "", "output": "the answer is good"},
              {"instruction": "add two numbers", "input": "2 and 3", "output": "the sum is 5"}]
    gsm = [{"question": "what is the sum of 2 and 3?", "answer": "2 + 3 = 5\n#### 5"},
           {"question": "what is 4 and 4?", "answer": "4 + 4 = 8\n#### 8"}]
    for name, rows in (("alpaca", alpaca), ("gsm8k", gsm)):
        for split, n in (("train", 6), ("test", 3)):
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (rows * 3)[:n]))
    (root / "humaneval").mkdir(exist_ok=True)
    problems = [{"task_id": f"HumanEval/{i}", "prompt": f"def add{i}(x, y):\n    \"\"\"add\"\"\"\n",
                 "canonical_solution": "    return x + y\n", "entry_point": f"add{i}",
                 "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"} for i in range(2)]
    with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(p) + "\n" for p in problems)
    return root


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-loop")
    return {"bert": tiny_bert_dir(root), "llama": tiny_llama_dir(root),
            "data": write_instruct(write_rte(root / "data"))}


def rte_config(shared, tmp_path, *overrides: str):
    return load_run_config("rte_minilm_adalora", [
        f"model={shared['bert']}", f"data_dir={shared['data']}", f"output_dir={tmp_path}", "run_name=run",
        "steps=4", "batch_size=4", "eval_every=2", "progress=false", "adapter.target_modules=[query,value]",
        "adapter.allocator.deltaT=1", "adapter.allocator.target_r=4", *overrides])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_glue_run_writes_every_file_and_scores_the_dev_rows(shared, tmp_path):
    cfg = rte_config(shared, tmp_path)
    result = train(cfg)
    run = tmp_path / "run"
    assert result.run_dir == run and result.status == "completed" and result.steps_done == 4
    for name in ("config.yaml", "log.jsonl", "eval.json", "predictions.jsonl", "loss.png", "ranks.png", "ranks.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # the resolved config loads back; the data dir is recorded as the absolute path used
    saved = load_run(run)
    assert saved.steps == 4 and Path(saved.data_dir) == shared["data"].resolve()
    assert saved.adapter.modules_to_save == ("classifier",)
    log = read_jsonl(run / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for row in log:
        assert {"loss", "task_loss", "regularizer", "lr", "step_time", "total_rank", "grad_norm"} <= set(row)
        assert row["loss"] == pytest.approx(row["task_loss"] + cfg.adapter.gamma * row["regularizer"], rel=1e-5)
    assert log[0]["total_rank"] == 12 * 4  # 4 modules (query, value x 2 layers) at r=12
    assert log[-1]["total_rank"] < log[0]["total_rank"]  # the allocator pruned
    assert log[-1]["lr"] < log[1]["lr"]  # cosine decay
    # eval.json: every evaluation, the final one on all dev rows, and the checkpoint step
    ev = json.loads((run / "eval.json").read_text())
    assert [h["step"] for h in ev["history"]] == [2, 4]
    assert ev["num_examples"] == ev["final"]["num_examples"] == len(RTE_DEV)
    assert ev["checkpoint"] == {"step": 4, "reason": "final"} and ev["status"] == "completed"
    preds = read_jsonl(run / "predictions.jsonl")
    labels = [r.label for r in read_glue("rte", "dev", shared["data"])]
    assert [p["label"] for p in preds] == labels
    expected = glue_metrics("rte", [p["prediction"] for p in preds], labels)["accuracy"]
    assert ev["final"]["accuracy"] == pytest.approx(expected)
    ranks = json.loads((run / "ranks.json").read_text())
    assert len(ranks["modules"]) == 4 and ranks["history"][0]["step"] == 0
    # the saved adapter reproduces the predictions
    base, tok = load_model(str(shared["bert"]), num_labels=2)
    model = load_adapter(base, run / "adapter").eval()
    rows = read_glue("rte", "dev", shared["data"])
    with torch.no_grad():
        batch = tok([r.text_a for r in rows], [r.text_b for r in rows], padding=True, return_tensors="pt")
        assert model(**batch).logits.argmax(-1).tolist() == [p["prediction"] for p in preds]


def test_same_seed_same_run_and_existing_run_dir(shared, tmp_path):
    a = train(rte_config(shared, tmp_path, "run_name=a", "eval_every=0"))
    b = train(rte_config(shared, tmp_path, "run_name=b", "eval_every=0"))
    assert [r["loss"] for r in a.log] == [r["loss"] for r in b.log]
    c = train(rte_config(shared, tmp_path, "run_name=c", "eval_every=0", "seed=1"))
    assert [r["loss"] for r in c.log] != [r["loss"] for r in a.log]
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        train(rte_config(shared, tmp_path, "run_name=a"))


def test_gradient_accumulation_averages_micro_batches(shared, tmp_path):
    full = train(rte_config(shared, tmp_path, "run_name=full", "steps=1", "eval_every=0", "adapter.method=lora",
                            "adapter.allocator=null", "adapter.r=4"))
    accum = train(rte_config(shared, tmp_path, "run_name=accum", "steps=1", "eval_every=0", "adapter.method=lora",
                             "adapter.allocator=null", "adapter.r=4", "batch_size=2", "grad_accum=2"))
    assert accum.log[0]["loss"] == pytest.approx(full.log[0]["loss"], rel=1e-5)
    assert accum.log[0]["grad_norm"] == pytest.approx(full.log[0]["grad_norm"], rel=1e-4)



class _Regression(torch.nn.Module):
    """``loss = mean((x @ w + b - y) ** 2)``; records the ``after_step`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1, dtype=torch.float64)
        self.after = []

    def forward(self, x, y):
        from types import SimpleNamespace

        return SimpleNamespace(loss=((self.lin(x).squeeze(-1) - y) ** 2).mean())

    def after_step(self, step):
        self.after.append((step, self.lin.weight.detach().clone()))


def _regression_batches():
    gen = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, 3, generator=gen, dtype=torch.float64),
             "y": torch.randn(4, generator=gen, dtype=torch.float64)} for _ in range(2)]


def test_optimizer_step_accumulates_clips_and_updates_as_computed_by_hand():
    from hyperadalora.train import optimizer_step

    torch.manual_seed(0)
    model = _Regression()
    w0, b0 = model.lin.weight.detach().clone()[0], model.lin.bias.detach().clone()
    batches = _regression_batches()
    # by hand: each micro-batch's gradient of its mean squared error, averaged over the two
    grads_w, grads_b, losses = [], [], []
    for batch in batches:
        r = batch["x"] @ w0 + b0 - batch["y"]
        losses.append(float((r ** 2).mean()))
        grads_w.append(2 * batch["x"].T @ r / len(r))
        grads_b.append(2 * r.mean())
    gw, gb = (grads_w[0] + grads_w[1]) / 2, (grads_b[0] + grads_b[1]) / 2
    norm = float(torch.sqrt((gw ** 2).sum() + gb ** 2))
    scale = min(1.0, 0.1 / (norm + 1e-6))  # clip_grad_norm_'s max_norm / (norm + 1e-6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    updates = []
    stats = optimizer_step(model, optimizer, batches, step_index=7, max_grad_norm=0.1, scheduler=scheduler,
                           on_update=lambda: updates.append(model.lin.weight.detach().clone()))
    assert stats.finite and stats.problem is None
    assert stats.loss == pytest.approx(sum(losses) / 2) and stats.grad_norm == pytest.approx(norm)
    assert norm > 0.1 and stats.lr == 0.5 and stats.lr_factor == 1.0 and stats.task_loss is None
    assert torch.allclose(model.lin.weight[0], w0 - 0.5 * scale * gw)
    assert torch.allclose(model.lin.bias, b0 - 0.5 * scale * gb)
    assert torch.equal(updates[0][0], w0)  # on_update runs before optimizer.step()
    assert [s for s, _ in model.after] == [7] and torch.equal(model.after[0][1], model.lin.weight.detach())
    assert optimizer.param_groups[0]["lr"] == 0.25  # the scheduler stepped once
    assert all(p.grad is None for p in model.parameters())


def test_optimizer_step_applies_nothing_after_a_non_finite_loss():
    from hyperadalora.train import optimizer_step

    model = _Regression()
    before = [p.detach().clone() for p in model.parameters()]
    batches = _regression_batches()
    batches[0]["y"][0] = float("nan")
    drawn = []

    def lazy():
        for batch in batches:
            drawn.append(batch)
            yield batch

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    stats = optimizer_step(model, optimizer, lazy(), step_index=2, max_grad_norm=1.0, grad_accum=2,
                           on_update=lambda: pytest.fail("no update after a NaN"))
    assert not stats.finite and stats.grad_norm is None
    assert stats.problem == "the loss is nan at step 3 (micro-batch 1 of 2)"
    assert len(drawn) == 1 and model.after == []  # the second micro-batch was never made
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())

def test_hyper_source_run_with_its_own_learning_rate(shared, tmp_path):
    result = train(rte_config(shared, tmp_path, "adapter.source=hyper", "adapter.hyper.hidden=16",
                              "adapter.hyper.lr=1e-4", "eval_every=0", "steps=3", "warmup_steps=0"))
    log = result.log
    assert len(log) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert log[0]["hyper_lr"] == pytest.approx(1e-4) and log[0]["lr"] == pytest.approx(3e-3)
    assert (result.run_dir / "adapter" / "adapter_config.json").is_file()


def test_hyper_per_step_generation_with_gradient_accumulation(shared, tmp_path):
    result = train(rte_config(shared, tmp_path, "adapter.source=hyper", "adapter.hyper.hidden=16",
                              "adapter.hyper.generate=per_step", "batch_size=2", "grad_accum=2", "eval_every=2"))
    assert [r["step"] for r in result.log] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0 for r in result.log)
    assert result.log[-1]["total_rank"] < result.log[0]["total_rank"]  # the allocator saw gradients


def test_nonfinite_loss_stops_and_keeps_the_last_good_adapter(shared, tmp_path):
    cfg = rte_config(shared, tmp_path, "steps=6", "eval_every=2")
    base, tok = load_model(str(shared["bert"]), num_labels=2)
    calls = {"n": 0}

    def poison(module, args, kwargs, output):  # the 5th training forward (step 5) returns NaN
        if module.training:
            calls["n"] += 1
            if calls["n"] == 5:
                output.loss = output.loss * float("nan")
        return output

    base.register_forward_hook(poison, with_kwargs=True)
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 5.*last good adapter \(step 4\)"):
        train(cfg, base_model=base, tokenizer=tok)
    run = tmp_path / "run"
    ev = json.loads((run / "eval.json").read_text())
    assert ev["status"] == "stopped: non-finite loss" and ev["checkpoint"]["step"] == 4
    assert "Lower lr" in ev["message"]
    assert len(read_jsonl(run / "log.jsonl")) == 4
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "loss.png").is_file()
    state = load_adapter(load_model(str(shared["bert"]), num_labels=2)[0], run / "adapter")
    assert all(torch.isfinite(p).all() for p in state.parameters())


def test_nan_on_the_first_step_saves_nothing(shared, tmp_path):
    cfg = rte_config(shared, tmp_path, "steps=3")
    base, tok = load_model(str(shared["bert"]), num_labels=2)
    base.register_forward_hook(lambda m, a, k, out: setattr(out, "loss", out.loss + float("inf")) or out,
                               with_kwargs=True)
    with pytest.raises(NonFiniteLossError, match=r"the loss is inf at step 1.*no adapter was saved"):
        train(cfg, base_model=base, tokenizer=tok)
    assert not (tmp_path / "run" / "adapter").exists()


def test_ctrl_c_keeps_the_log_plots_and_adapter(shared, tmp_path):
    cfg = rte_config(shared, tmp_path, "steps=6", "eval_every=0")
    base, tok = load_model(str(shared["bert"]), num_labels=2)
    calls = {"n": 0}

    def interrupt(module, args, kwargs, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
        return output

    base.register_forward_hook(interrupt, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt, match="interrupted after 3 of 6 steps"):
        train(cfg, base_model=base, tokenizer=tok)
    run = tmp_path / "run"
    ev = json.loads((run / "eval.json").read_text())
    assert ev["status"] == "interrupted" and ev["checkpoint"] == {"step": 3, "reason": "interrupted"}
    assert len(read_jsonl(run / "log.jsonl")) == 3 and (run / "loss.png").is_file()
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_instruction_tuning_run_generates_and_scores(shared, tmp_path):
    cfg = load_run_config("alpaca_smollm2_adalora", [
        f"model={shared['llama']}", f"data_dir={shared['data']}", f"output_dir={tmp_path}", "run_name=alpaca",
        "steps=2", "batch_size=2", "grad_accum=1", "max_length=64", "eval_every=0", "eval_rows=2", "max_new_tokens=4",
        "progress=false", "adapter.target_modules=[q_proj,v_proj]"])
    result = train(cfg)
    assert set(result.final_metrics) >= {"bleu4", "rouge1", "num_examples"}
    assert result.final_metrics["num_examples"] == 2
    preds = read_jsonl(result.run_dir / "predictions.jsonl")
    assert [p["reference"] for p in preds] == ["the answer is good", "the sum is 5"]
    assert all(isinstance(p["generation"], str) and "### Response:" in p["prompt"] for p in preds)
    # gsm8k: exact match of the final number; evaluation of the same adapter through evaluate_run
    gsm = evaluate_run(load_run(result.run_dir, ["task=gsm8k", "eval_rows=2"]),
                       adapter_dir=result.run_dir / "adapter", out=tmp_path / "gsm.json")
    assert gsm["primary_metric"] == "exact_match" and gsm["num_examples"] == 2
    assert 0.0 <= gsm["metrics"]["exact_match"] <= 1.0
    assert (tmp_path / "gsm.predictions.jsonl").is_file()


def trained_model_and_rows(run_dir: Path):
    """The run's final model (base + saved adapter, eval mode) and its task's held-out rows, bound."""
    from hyperadalora.tasks import make_task, resolve_data
    from hyperadalora.train.evaluate import load_trained

    config = load_run(run_dir)
    model, tokenizer = load_trained(config, run_dir / "adapter")
    task = make_task(config, resolve_data(config.data_dir, config.task))
    task.bind(tokenizer)
    return model.eval(), task, task.eval_rows()


def test_the_held_out_loss_is_the_mean_over_every_target_of_the_evaluation_rows(shared, tmp_path):
    """eval_loss at the last step, taken in uneven batches of padded rows, equals the loss of the
    saved adapter computed row by row (no padding) and averaged over targets by hand: labels for
    the classifier, response tokens for the instruction task."""
    import torch.nn.functional as F

    glue = train(rte_config(shared, tmp_path, "run_name=glue", "eval_loss_every=4", "eval_batch_size=2"))
    model, task, rows = trained_model_and_rows(glue.run_dir)
    assert len(rows) == 5  # batches of 2, 2 and 1
    with torch.no_grad():
        per_row = [F.cross_entropy(model(**(b := task.collate([r]))).logits, b["labels"]) for r in rows]
    assert read_jsonl(glue.run_dir / "log.jsonl")[-1]["eval_loss"] == pytest.approx(float(sum(per_row)) / 5, abs=1e-5)

    # Responses of 2, 4 and 6 words: the first batch holds 2 rows of 3 but 8 targets of 15.
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"instruction": "write a good answer", "input": "", "output": out}) + "\n"
                                for out in ("very good", "the sum is 5", "the cat sat on the mat")))
    cfg = load_run_config("alpaca_smollm2_adalora", [
        f"model={shared['llama']}", f"data_dir={shared['data']}", f"output_dir={tmp_path}", "run_name=lm", "steps=2",
        "batch_size=2", "max_length=64", f"eval_data_source={held_out}", "eval_batch_size=2", "eval_loss_every=1",
        "max_new_tokens=2", "progress=false", "adapter.target_modules=[q_proj,v_proj]"])
    lm = train(cfg)
    model, task, rows = trained_model_and_rows(lm.run_dir)
    total = tokens = 0.0
    for row in rows:
        batch = task.collate([row])
        with torch.no_grad():
            logits, labels = model(**batch).logits[0, :-1], batch["labels"][0, 1:]
        keep = labels != -100
        total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        tokens += int(keep.sum())
    assert [int((task.collate([r])["labels"] != -100).sum()) for r in rows] == [3, 5, 7]  # with EOS
    log = read_jsonl(lm.run_dir / "log.jsonl")
    assert [r["step"] for r in log if "eval_loss" in r] == [1, 2]
    assert log[-1]["eval_loss"] == pytest.approx(total / tokens, abs=1e-5)


def test_eval_loss_every_must_be_a_count(shared, tmp_path):
    with pytest.raises(ValueError, match="eval_loss_every"):
        rte_config(shared, tmp_path, "eval_loss_every=-1")


def test_instruct_task_holds_out_the_tail_of_a_local_file(shared, tmp_path):
    rows = [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(10)]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from hyperadalora.tasks import make_task

    cfg = load_run_config(None, ["task=instruct", f"data_source={path}", "eval_rows=3"])
    task = make_task(cfg, tmp_path)
    assert [r.instruction for r in task.train_rows()] == [f"task {i}" for i in range(7)]
    assert [r.instruction for r in task.eval_rows()] == [f"task {i}" for i in range(7, 10)]


def test_humaneval_is_evaluation_only_and_runs_in_the_sandbox(shared, tmp_path):
    cfg = load_run_config("humaneval_smollm2", [f"model={shared['llama']}", f"data_dir={shared['data']}",
                                                "max_new_tokens=3", "sandbox_workers=1", "sandbox_timeout_s=20"])
    with pytest.raises(ValueError, match="evaluation only"):
        train(cfg)
    result = evaluate_run(cfg)
    assert result["primary_metric"] == "pass@1" and result["num_examples"] == 2
    assert result["metrics"]["pass@1"] == 0.0  # a random tiny model does not write add()


def test_truncate_at_stops():
    from hyperadalora.tasks import truncate_at_stops

    assert truncate_at_stops("    return x\n\ndef other():\n    pass") == "    return x\n"
    assert truncate_at_stops("    return x\nprint(1)") == "    return x"
    assert truncate_at_stops("    return x") == "    return x"


def test_generation_stops_a_row_once_its_continuation_holds_a_stop_string():
    from test_instruct_data import ids, make_tokenizer

    from hyperadalora.tasks import _StopOnStrings

    tok = make_tokenizer()
    prompt = ids("say", "hi")  # the stop word in the prompt must not count
    rows = torch.tensor([prompt + ids("hello", "there", "x"), prompt + ids("hello", "y", "z")])
    assert _StopOnStrings(tok, ["there"], len(prompt))(rows, None).tolist() == [True, False]
    assert _StopOnStrings(tok, ["hi", "y"], len(prompt))(rows, None).tolist() == [False, True]
    assert _StopOnStrings(tok, ["hi"], 0)(rows, None).tolist() == [True, True]


@pytest.mark.parametrize("export", ["peft", "merged"])
def test_a_completed_run_exports_what_export_asks_for(shared, tmp_path, export):
    """export=peft: peft loads RUN_DIR/peft_adapter alone; export=merged: transformers loads RUN_DIR/merged alone;
    both give the outputs of the run's own adapter (loaded back with ha.load_adapter)."""
    import peft
    from transformers import AutoModelForSequenceClassification

    result = train(rte_config(shared, tmp_path, f"export={export}"))
    run = result.run_dir
    base = lambda: AutoModelForSequenceClassification.from_pretrained(shared["bert"])  # noqa: E731
    ours = load_adapter(base(), run / "adapter").eval()
    if export == "peft":
        other = peft.PeftModel.from_pretrained(base(), str(run / "peft_adapter")).eval()
        assert not (run / "merged").exists()
    else:
        other = AutoModelForSequenceClassification.from_pretrained(run / "merged").eval()
        assert (run / "merged" / "tokenizer_config.json").is_file() and not (run / "peft_adapter").exists()
    batch = {"input_ids": torch.tensor([[2, 5, 6, 7, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]])}
    with torch.no_grad():
        torch.testing.assert_close(other(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-6)


def test_export_merged_is_refused_on_a_quantised_base_before_the_run(shared, tmp_path):
    with pytest.raises(ValueError, match="export=merged on a quantize=4bit base"):
        rte_config(shared, tmp_path, "export=merged", "quantize=4bit")
    assert not (tmp_path / "run").exists()
