"""Training checkpoints and resume: a stopped run continues with exactly the losses of an uninterrupted one.

Runs on the tiny BERT folder of ``test_train_loop.py`` with adapter dropout on (so the restored
torch RNG matters). A crash is simulated in-process by a forward hook that raises (no handler in
the loop runs, as after a kill); ``test_sigkill_then_resume_from_the_command_line`` kills a real
``python -m hyperadalora.cli train`` process with SIGKILL.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hyperadalora.checkpoint import CorruptCheckpointError, verify_checkpoint, write_manifest
from hyperadalora.cli import main
from hyperadalora.models import load_model
from hyperadalora.train import load_run, train
from hyperadalora.train.resume import checkpoint_dirs, flatten_optimizer_state, unflatten_optimizer_state
from hyperadalora.train.rng import capture_rng, restore_rng
from test_train_loop import read_jsonl, rte_config, tiny_bert_dir, write_rte

ROOT = Path(__file__).resolve().parents[2]

METHODS = {
    "adalora": ["adapter.lora_dropout=0.1"],
    "adalora-hyper-accum": ["adapter.lora_dropout=0.1", "adapter.source=hyper", "adapter.hyper.hidden=16",
                            "batch_size=2", "grad_accum=2"],
    "lora": ["adapter.method=lora", "adapter.allocator=null", "adapter.r=4", "adapter.lora_dropout=0.1"],
    "dora": ["adapter.method=dora", "adapter.allocator=null", "adapter.r=4", "adapter.lora_dropout=0.1"],
    "dylora": ["adapter.method=dylora", "adapter.allocator=null", "adapter.r=4"],
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {"bert": tiny_bert_dir(root), "data": write_rte(root / "data")}


def crashing_base(shared, at_forward: int, error: BaseException | None = None):
    """The tiny BERT with a hook that raises ``error`` (default: a RuntimeError, as a crash) at the
    ``at_forward``-th training forward (1-based)."""
    base, tok = load_model(str(shared["bert"]), num_labels=2)
    calls = {"n": 0}

    def crash(module, args, kwargs, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == at_forward:
                raise error if error is not None else RuntimeError("simulated crash")
        return output

    base.register_forward_hook(crash, with_kwargs=True)
    return base, tok


def crash_run(shared, cfg, crash_step: int):
    """Trains ``cfg`` until the first forward of optimizer step ``crash_step`` (1-based), then crashes."""
    base, tok = crashing_base(shared, (crash_step - 1) * cfg.grad_accum + 1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, base_model=base, tokenizer=tok)
    return Path(cfg.output_dir) / cfg.run_name


def columns(log: list[dict]) -> dict[str, list]:
    return {k: [r.get(k) for r in log] for k in ("step", "loss", "task_loss", "regularizer", "lr", "grad_norm",
                                                   "total_rank", "budget", "eval_loss")}


def assert_same_run(run: Path, ref: Path) -> None:
    assert columns(read_jsonl(run / "log.jsonl")) == columns(read_jsonl(ref / "log.jsonl"))  # bit for bit
    a, b = load_file(str(run / "adapter" / "adapter_model.safetensors")), load_file(
        str(ref / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ev, ev_ref = json.loads((run / "eval.json").read_text()), json.loads((ref / "eval.json").read_text())
    assert ev["status"] == "completed" and ev["steps_done"] == ev_ref["steps_done"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(ev["history"]) == strip(ev_ref["history"])
    if (ref / "ranks.json").is_file():
        assert json.loads((run / "ranks.json").read_text()) == json.loads((ref / "ranks.json").read_text())


@pytest.mark.parametrize("method", list(METHODS))
def test_crash_then_resume_gives_the_uninterrupted_losses(shared, tmp_path, method):
    overrides = ["steps=7", "eval_every=3", "save_every=2", "eval_loss_every=2", *METHODS[method]]
    ref = train(rte_config(shared, tmp_path, "run_name=ref", *overrides)).run_dir
    assert [r["step"] for r in read_jsonl(ref / "log.jsonl") if "eval_loss" in r] == [2, 4, 6, 7]  # and the last
    cfg = rte_config(shared, tmp_path, "run_name=run", *overrides)
    run = crash_run(shared, cfg, crash_step=6)  # checkpoints at steps 2 and 4; log lines up to step 5
    assert [s for s, _ in checkpoint_dirs(run)] == [2, 4]
    assert len(read_jsonl(run / "log.jsonl")) == 5
    result = train(load_run(run), resume=run)
    assert result.resumed_from_step == 4 and result.steps_done == 7 and result.status == "completed"
    assert [r["step"] for r in result.log] == list(range(1, 8))
    assert_same_run(run, ref)
    # the final checkpoint (step 7) and the one before it are kept (keep_checkpoints=2)
    assert [s for s, _ in checkpoint_dirs(run)] == [6, 7]
    for _, folder in checkpoint_dirs(run):
        verify_checkpoint(folder)


@pytest.mark.parametrize("method", list(METHODS))
def test_the_held_out_loss_leaves_the_training_run_as_it_was(shared, tmp_path, method):
    """eval_loss_every adds a number to the log and changes nothing else: no random draw (dropout,
    DyLoRA's sampled rank), no optimizer or allocator state, no generated factor survives it."""
    plain = train(rte_config(shared, tmp_path, "run_name=plain", "steps=5", "eval_every=0", *METHODS[method]))
    held = train(rte_config(shared, tmp_path, "run_name=held", "steps=5", "eval_every=0", "eval_loss_every=1",
                            *METHODS[method]))
    log = read_jsonl(held.run_dir / "log.jsonl")
    assert all(isinstance(r["eval_loss"], float) for r in log)
    without = {k: v for k, v in columns(log).items() if k != "eval_loss"}
    assert without == {k: v for k, v in columns(read_jsonl(plain.run_dir / "log.jsonl")).items() if k != "eval_loss"}
    a = load_file(str(held.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(plain.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_writes_a_checkpoint_of_the_last_step_and_resume_continues(shared, tmp_path):
    overrides = ["steps=6", "eval_every=0", "adapter.lora_dropout=0.1"]
    ref = train(rte_config(shared, tmp_path, "run_name=ref", *overrides)).run_dir
    cfg = rte_config(shared, tmp_path, "run_name=run", *overrides)
    base, tok = crashing_base(shared, 4, KeyboardInterrupt())  # Ctrl-C in the 4th step's forward
    with pytest.raises(KeyboardInterrupt, match=r"interrupted after 3 of 6 steps.*--resume .*from step 3"):
        train(cfg, base_model=base, tokenizer=tok)
    run = tmp_path / "run"
    assert [s for s, _ in checkpoint_dirs(run)] == [3]
    train(load_run(run, ["progress=false", "threads=1"]), resume=run)  # overrides that do not change the run
    assert_same_run(run, ref)


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing_manifest"])
def test_a_damaged_newest_checkpoint_is_refused_and_the_previous_one_used(shared, tmp_path, capfd, damage):
    overrides = ["steps=6", "eval_every=0", "save_every=2", "keep_checkpoints=3", "adapter.lora_dropout=0.1"]
    ref = train(rte_config(shared, tmp_path, "run_name=ref", *overrides)).run_dir
    run = crash_run(shared, rte_config(shared, tmp_path, "run_name=run", *overrides), crash_step=6)
    newest = run / "checkpoints" / "step-4"
    target = newest / ("optimizer.safetensors" if damage == "truncate" else
                       "manifest.json" if damage == "missing_manifest" else "adapter_model.safetensors")
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        pattern = r"adapter_model\.safetensors does not match its SHA-256"
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-7]))
        pattern = r"optimizer\.safetensors is truncated \(\d+ bytes, the manifest says \d+\)"
    else:
        target.unlink()
        pattern = r"incomplete checkpoint: .*manifest\.json is missing"
    with pytest.raises(CorruptCheckpointError, match=pattern) as info:
        verify_checkpoint(newest)
    assert info.value.path == target and str(target) in str(info.value) and "delete" in str(info.value)
    verify_checkpoint(run / "checkpoints" / "step-2")
    leftover = run / "checkpoints" / ".step-6.tmp"  # as a kill while writing a checkpoint leaves it
    leftover.mkdir()
    (leftover / "adapter_model.safetensors").write_bytes(b"partial")
    capfd.readouterr()
    result = train(load_run(run), resume=run)
    err = capfd.readouterr().err
    assert "warning: skipping checkpoint step-4" in err and str(target) in err
    assert result.resumed_from_step == 2
    assert_same_run(run, ref)
    assert (run / "checkpoints" / "corrupt-step-4").is_dir()  # set aside, not silently reused
    assert not leftover.exists()
    for _, folder in checkpoint_dirs(run):
        verify_checkpoint(folder)


def logged(run: Path) -> int:
    """Complete lines in ``run/log.jsonl``."""
    path = run / "log.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def test_sigkill_then_resume_from_the_command_line(shared, tmp_path, capsys):
    args = ["train", "rte_minilm_adalora", "--data-dir", str(shared["data"]), "--output-dir", str(tmp_path),
            "--no-progress", f"model={shared['bert']}", "steps=40", "batch_size=4", "eval_every=0", "save_every=4",
            "threads=1", "adapter.target_modules=[query,value]", "adapter.allocator.target_r=4",
            "adapter.allocator.deltaT=1", "adapter.lora_dropout=0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    with open(tmp_path / "killed.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "hyperadalora.cli", *args, "run_name=run"],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
    run = tmp_path / "run"
    deadline = time.monotonic() + 120
    try:
        # kill once checkpoint step-8 is complete and the log has gone past it (those lines are redone)
        while not ((run / "checkpoints" / "step-8").is_dir() and logged(run) >= 10):
            assert proc.poll() is None, (tmp_path / "killed.err").read_text()
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = logged(run)
    assert 10 <= killed_at < 40, killed_at  # killed mid-way
    code = main([*args, "run_name=ref"])
    assert code == 0, capsys.readouterr().err
    code = main(["train", "--resume", str(run), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["steps_done"] == 40
    assert_same_run(run, tmp_path / "ref")


def test_resume_refuses_changes_finished_runs_and_runs_without_checkpoints(shared, tmp_path, capsys):
    cfg = rte_config(shared, tmp_path, "run_name=run", "steps=5", "eval_every=0", "save_every=2")
    run = crash_run(shared, cfg, crash_step=4)
    with pytest.raises(ValueError, match=r"lr \(0\.003 in the run, 0\.01 now\).*start a new run"):
        train(load_run(run, ["lr=1e-2"]), resume=run)
    with pytest.raises(ValueError, match=r"adapter\.r \(12 in the run, 8 now\)"):
        train(load_run(run, ["adapter.r=8"]), resume=run)
    code = main(["train", "rte_minilm_adalora", "--resume", str(run)])
    assert code == 2 and "drop config 'rte_minilm_adalora'" in capsys.readouterr().err
    code = main(["train", "--resume", str(tmp_path / "nothing")])
    assert code == 2 and "not a run directory" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    code = main(["train", "--resume", str(run)])
    assert code == 2 and "already completed its 5 steps" in capsys.readouterr().err
    # a run stopped before its first checkpoint, and one whose every checkpoint is damaged
    early = crash_run(shared, cfg.replace(run_name="early"), crash_step=2)
    with pytest.raises(FileNotFoundError, match="holds no training checkpoint"):
        train(load_run(early), resume=early)
    bad = crash_run(shared, cfg.replace(run_name="bad"), crash_step=4)
    (bad / "checkpoints" / "step-2" / "trainer_state.json").write_text("{}\n")
    with pytest.raises(CorruptCheckpointError, match=r"no usable checkpoint .*trainer_state\.json"):
        train(load_run(bad), resume=bad)


def test_training_data_must_be_the_same(shared, tmp_path):
    run = crash_run(shared, rte_config(shared, tmp_path, "run_name=run", "steps=4", "eval_every=0",
                                       "save_every=2"), crash_step=4)
    other = write_rte(tmp_path / "other", train_rows=12)
    with pytest.raises(ValueError, match="training rows differ"):
        train(load_run(run, [f"data_dir={other}"]), resume=run)


def test_manifest_refuses_an_extra_and_a_missing_file(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"0123456789")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.json").write_text("{}")
    manifest = write_manifest(folder, step=3)
    assert manifest["step"] == 3 and set(manifest["files"]) == {"a.bin", "sub/b.json"}
    assert verify_checkpoint(folder) == manifest
    (folder / "extra.txt").write_text("x")
    with pytest.raises(CorruptCheckpointError, match=r"extra\.txt is not listed"):
        verify_checkpoint(folder)
    (folder / "extra.txt").unlink()
    (folder / "sub" / "b.json").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"b\.json is missing"):
        verify_checkpoint(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="not a valid manifest"):
        verify_checkpoint(folder)


def test_optimizer_and_rng_states_round_trip():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW([{"params": params[:1], "lr": 1e-3, "name": "a"}, {"params": params[1:], "lr": 2e-3}])
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    json.dumps(meta)  # JSON only, no pickle
    again = unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
    ref = opt.state_dict()
    assert again["param_groups"] == ref["param_groups"]
    assert all(torch.equal(again["state"][i][k], ref["state"][i][k]) for i in ref["state"] for k in ref["state"][i])
    saved = capture_rng()
    draws = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng(*saved)
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(2), draws[2])
