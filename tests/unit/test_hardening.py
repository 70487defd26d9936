"""Issue 21, items 3-13: misuse of runs, run directories, data, exports and the wrap / load / after_step API.

Each test reproduces a reported failure (it failed before the fix) and asserts the named error or the
corrected behaviour. Runs use the tiny BERT folder and the RTE rows of ``test_train_loop.py``.
"""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import hyperadalora as ha
from hyperadalora.adapter_io import ALLOC_META_NAME, ALLOC_TENSORS_NAME
from hyperadalora.cli import main
from hyperadalora.layers import AdaptedLinear
from hyperadalora.models import load_model
from hyperadalora.train import load_run, train
from hyperadalora.train.resume import checkpoint_dirs
from hyperadalora.train.rundir import OutputWriteError, RunDirBusyError, RunDirLock, make_run_dir
from hyperadalora.train.state import DIVERGE_FACTOR, EARLY_STEPS
from test_train_loop import read_jsonl, rte_config, tiny_bert_dir, write_rte
from tiny_models import BERT_TARGETS, bert_batch, contract_step, tiny_bert, train_steps


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("harden")
    return {"bert": tiny_bert_dir(root), "data": write_rte(root / "data")}


def base_with_hook(shared, when):
    """The tiny BERT with a forward hook that raises ``RuntimeError("simulated crash")`` when
    ``when(module, n)`` is true (``n``: training forwards so far, 1-based)."""
    base, tok = load_model(str(shared["bert"]), num_labels=2)
    calls = {"n": 0}

    def hook(module, args, kwargs, output):
        calls["n"] += module.training
        if when(module, calls["n"]):
            raise RuntimeError("simulated crash")
        return output

    base.register_forward_hook(hook, with_kwargs=True)
    return base, tok


def crashed_run(shared, tmp_path, *overrides, crash_forward=3):
    """A run killed at the ``crash_forward``-th training forward (a checkpoint every 2 steps)."""
    cfg = rte_config(shared, tmp_path, "save_every=2", "eval_every=0", *overrides)
    base, tok = base_with_hook(shared, lambda m, n: m.training and n == crash_forward)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, base_model=base, tokenizer=tok)
    return tmp_path / "run"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- item 3: a hand-edited config.yaml ------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("lr", "0.03"), ("seed", "7")])
def test_resume_refuses_a_hand_edited_config(shared, tmp_path, field, value):
    run = crashed_run(shared, tmp_path)
    path = run / "config.yaml"
    text, n = re.subn(rf"^{field}: .*$", f"{field}: {value}", path.read_text(), flags=re.M)
    assert n == 1
    path.write_text(text)
    before = snapshot(run)
    with pytest.raises(ValueError, match=rf"{field} \(.* in the checkpoint, .* now\).*edited by hand"):
        train(load_run(run), resume=run)
    assert snapshot(run) == before


# -- item 4: one process per run directory ----------------------------------------------------------

def test_a_locked_run_directory_is_refused_naming_the_pid(shared, tmp_path):
    run = crashed_run(shared, tmp_path)
    holder = RunDirLock(run).acquire()  # another process's lock: flock is per open file description
    try:
        with pytest.raises(RunDirBusyError, match=r"in use by pid \d+"):
            train(load_run(run), resume=run)
    finally:
        holder.release()
    assert train(load_run(run), resume=run).status == "completed"  # free again


def test_make_run_dir_accepts_a_directory_once(shared, tmp_path):
    cfg = rte_config(shared, tmp_path, "run_name=same")
    first, lock = make_run_dir(cfg)
    with pytest.raises(RunDirBusyError, match="in use by pid"):
        make_run_dir(cfg)
    (first / "config.yaml").write_text("x: 1\n")
    lock.release()
    with pytest.raises(FileExistsError, match="not empty"):
        make_run_dir(cfg)


# -- item 5: unwritable or full output --------------------------------------------------------------

def test_unwritable_output_dir_is_named_before_data_and_model_load(shared, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = rte_config(shared, tmp_path, f"output_dir={blocker / 'runs'}", "model=/nonexistent/model",
                     f"data_dir={tmp_path / 'no-data'}")
    with pytest.raises(OutputWriteError, match="is not a folder"):
        train(cfg)


def test_full_disk_becomes_a_named_error_saying_what_was_kept(shared, tmp_path, monkeypatch):
    import hyperadalora.fileio as fileio

    real = fileio.save_file
    calls = {"n": 0}

    def failing(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] > 6:  # the first checkpoint (adapter, allocator, optimizer, rng) and adapter/ go through
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(fileio, "save_file", failing)
    cfg = rte_config(shared, tmp_path, "save_every=2", "eval_every=2")
    with pytest.raises(OutputWriteError, match=r"No space left on device.*training checkpoint step-2") as info:
        train(cfg)
    assert isinstance(info.value.__cause__, OSError)
    assert [n for n, _ in checkpoint_dirs(tmp_path / "run")] == [2]


# -- item 6: pruning on resume, a damaged log ------------------------------------------------------

def test_resume_prunes_checkpoints_left_by_a_kill_after_the_final_rename(shared, tmp_path):
    cfg = rte_config(shared, tmp_path, "save_every=1", "eval_every=0", "keep_checkpoints=2")
    base, tok = base_with_hook(shared, lambda m, n: not m.training)  # killed in the final evaluation
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, base_model=base, tokenizer=tok)
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / "step-3", ckpts / "step-2")  # the one the kill left unpruned
    assert [n for n, _ in checkpoint_dirs(run)] == [2, 3, 4]
    result = train(load_run(run), resume=run)
    assert result.status == "completed" and result.steps_done == 4
    assert [n for n, _ in checkpoint_dirs(run)] == [3, 4]


def test_damaged_log_is_rebuilt_and_the_run_continues_exactly(shared, tmp_path, capsys):
    whole = train(rte_config(shared, tmp_path / "whole", "save_every=2", "eval_every=0"))
    run = crashed_run(shared, tmp_path / "cut")
    lines = (run / "log.jsonl").read_text().splitlines()
    lines[0] = '{"step": 1, "loss": 0.69'  # damaged on disk
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    result = train(load_run(run), resume=run)
    assert "log.jsonl was damaged" in capsys.readouterr().err
    assert result.status == "completed" and result.steps_done == 4
    log = read_jsonl(run / "log.jsonl")
    assert [r["step"] for r in log] == [2, 3, 4]
    assert [r["loss"] for r in log] == [r["loss"] for r in whole.log[1:]]  # bit for bit


# -- item 7: empty data files, found before the model and the run directory -----------------------

@pytest.mark.parametrize("split", ["train", "dev"])
@pytest.mark.parametrize("content", ["", "index\tsentence1\tsentence2\tlabel\n"])
def test_empty_split_is_named_before_model_load_and_run_dir(shared, tmp_path, split, content):
    data = write_rte(tmp_path / "data")
    (data / "rte" / f"{split}.tsv").write_text(content)
    cfg = rte_config(shared, tmp_path / "out", f"data_dir={data}", "model=/nonexistent/model")
    with pytest.raises(ValueError, match=rf"{split}\.tsv:1: no data rows"):
        train(cfg)
    assert not (tmp_path / "out").exists()


# -- item 8: export refuses to overwrite the run ---------------------------------------------------

@pytest.fixture(scope="module")
def done_run(shared, tmp_path_factory):
    out = tmp_path_factory.mktemp("done")
    train(rte_config(shared, out, "steps=2", "eval_every=0"))
    return out / "run"


@pytest.mark.parametrize("inside", ["adapter", "adapter/sub", "checkpoints/step-2"])
def test_export_refuses_an_output_inside_the_run_adapter_or_checkpoints(done_run, capsys, inside):
    before = snapshot(done_run)
    assert main(["export", str(done_run), "--out", str(done_run / inside), "--force"]) == 2
    assert "lies inside" in capsys.readouterr().err
    assert snapshot(done_run) == before


def test_export_refuses_a_non_empty_output_unless_forced(done_run, tmp_path, capsys):
    out = tmp_path / "peft"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(done_run), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and not (out / "adapter_config.json").exists()
    assert main(["export", str(done_run), "--out", str(out), "--force"]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "notes.txt").read_text() == "mine"


# -- item 9: a failed load_adapter leaves the model as it was ------------------------------------

def _bert(hidden: int = 32, labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=120, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=labels))


@pytest.mark.parametrize("other", [{"hidden": 16}, {"labels": 3}])
def test_failed_load_adapter_leaves_the_model_untouched(tmp_path, other):
    model = ha.wrap(tiny_bert(), ha.AdapterConfig(method="lora", r=4, target_modules=BERT_TARGETS,
                                                  modules_to_save=("classifier",)))
    model.save_adapter(str(tmp_path / "a"))
    target = _bert(**other)
    for p in target.bert.encoder.layer[0].attention.self.query.parameters():
        p.requires_grad_(False)  # the user's own choice, to be kept
    trainable = {n: p.requires_grad for n, p in target.named_parameters()}
    modules = {n: type(m) for n, m in target.named_modules()}
    with pytest.raises(ValueError):
        ha.load_adapter(target, tmp_path / "a")
    assert not any(isinstance(m, AdaptedLinear) for m in target.modules())
    assert {n: type(m) for n, m in target.named_modules()} == modules
    assert {n: p.requires_grad for n, p in target.named_parameters()} == trainable


# -- item 10: wrapping twice -------------------------------------------------------------------------

def test_wrap_refuses_an_already_wrapped_model():
    cfg = ha.AdapterConfig(method="lora", r=2, target_modules=BERT_TARGETS)
    wrapped = ha.wrap(tiny_bert(), cfg)
    with pytest.raises(ValueError, match="already wrapped"):
        ha.wrap(wrapped, cfg)
    with pytest.raises(ValueError, match="already holds adapter layers"):
        ha.wrap(wrapped.model, cfg)
    assert isinstance(ha.wrap(wrapped.unwrap(), cfg), ha.AdaptedModel)  # unwrapped: fine again


# -- item 11: after_step's step ----------------------------------------------------------------------

def _adalora(total_step=20):
    return ha.wrap(tiny_bert(), ha.AdapterConfig(
        method="adalora", r=4, target_modules=BERT_TARGETS,
        allocator=ha.AllocatorConfig(total_step=total_step, target_r=2, tinit=1, tfinal=2, deltaT=1)))


def test_after_step_accepts_numpy_and_tensor_integers_and_refuses_going_back():
    m = _adalora()
    steps = [np.int64(0), torch.tensor(1), np.int32(2), 3]
    m.train()
    opt = torch.optim.AdamW(m.optimizer_param_groups(1e-3))
    for i, s in enumerate(steps):
        contract_step(m, bert_batch(i), opt, s)
    assert m.steps_taken == 4 and m.allocator.last_step == 3 and type(m.allocator.last_step) is int
    for bad, what in ((3, "steps must increase"), (1, "steps must increase"), (np.bool_(True), "non-negative int"),
                      (torch.tensor(4.0), "non-negative int"), (torch.tensor([4]), "non-negative int")):
        m(**bert_batch(9)).loss.backward()
        with pytest.raises(ValueError, match=what):
            m.after_step(bad)
        opt.zero_grad(set_to_none=True)
    assert m.steps_taken == 4


def test_after_step_at_the_final_phase_without_scores_is_a_clear_error():
    m = _adalora(total_step=6)  # the budget phase ends at step 6 - 2 = 4
    m.train()
    m(**bert_batch(0)).loss.backward()
    with pytest.raises(RuntimeError, match="no importance score exists yet"):
        m.after_step(4)


# -- item 12: eval / export / save_adapter targets, stale files, divergence ------------------------

def test_eval_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a run directory" in err and "config.yaml" in err


def test_eval_on_an_empty_config_file(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("")
    assert main(["eval", str(tmp_path / "empty.yaml")]) == 2
    assert "is empty" in capsys.readouterr().err


def test_export_and_save_adapter_onto_a_file(done_run, tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("keep")
    assert main(["export", str(done_run), "--out", str(path)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    model = ha.wrap(tiny_bert(), ha.AdapterConfig(method="lora", r=2, target_modules=BERT_TARGETS))
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        model.save_adapter(str(path))
    assert path.read_text() == "keep"


def test_save_adapter_into_a_reused_folder_drops_stale_allocator_state(tmp_path):
    adalora = _adalora()
    train_steps(adalora, 2)
    adalora.save_adapter(str(tmp_path))
    assert (tmp_path / ALLOC_META_NAME).is_file() and (tmp_path / ALLOC_TENSORS_NAME).is_file()
    ha.wrap(tiny_bert(), ha.AdapterConfig(method="lora", r=4, target_modules=BERT_TARGETS)).save_adapter(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_diverging_loss_is_warned_and_logged(shared, tmp_path, capsys):
    base, tok = load_model(str(shared["bert"]), num_labels=2)
    calls = {"n": 0}

    def blow_up(module, args, kwargs, output):  # the loss grows tenfold after the early steps
        if module.training:
            calls["n"] += 1
            if calls["n"] > EARLY_STEPS + 1:
                output.loss = output.loss * 10
        return output

    base.register_forward_hook(blow_up, with_kwargs=True)
    steps = EARLY_STEPS + 8
    result = train(rte_config(shared, tmp_path, f"steps={steps}", "eval_every=0"), base_model=base, tokenizer=tok)
    err = capsys.readouterr().err
    assert err.count("the loss is diverging") == 1 and "troubleshooting" in err
    flags = [r["diverging"] for r in read_jsonl(tmp_path / "run" / "log.jsonl")]
    assert flags[:EARLY_STEPS + 1] == [False] * (EARLY_STEPS + 1) and flags[-1] is True
    early = np.mean([r["loss"] for r in result.log[:EARLY_STEPS]])
    first = flags.index(True)
    ema = 0.0
    for i, r in enumerate(result.log[:first + 1], start=1):
        ema = 0.9 * ema + 0.1 * r["loss"]
    assert ema / (1 - 0.9 ** (first + 1)) > DIVERGE_FACTOR * early  # the rule, by hand


# -- item 13: progress off a terminal ----------------------------------------------------------------

def test_progress_off_a_terminal_is_plain_lines(shared, tmp_path, capsys):
    train(rte_config(shared, tmp_path, "progress=true", "eval_every=0"))
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "step 4/4 | loss" in err
