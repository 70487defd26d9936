"""`hyperadalora train` on several processes: torchrun / accelerate's environment, DDP and FSDP2 from
the command line against one process, rank-0-only writes, and resuming on 2 or 1 processes.

The references are the same command on one process (same global batch: ``batch_size`` is global),
and the uninterrupted run for resuming.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyperadalora.cli import main
from hyperadalora.train import RunConfig, load_run_config
from hyperadalora.train.parallel import SingleProcess, resolve_kind
from launch import torchrun_two_ranks
from test_train_loop import tiny_bert_dir, tiny_llama_dir, write_instruct, write_rte

TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
ACCELERATE_FSDP = {**TORCHRUN, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_MIXED_PRECISION": "no"}


def config(**overrides) -> RunConfig:
    return load_run_config("rte_minilm_adalora", {"batch_size": 4, **overrides})


# -- the launch: checked before anything loads -------------------------------------------------------

def test_auto_follows_the_launcher():
    assert resolve_kind(config(), {}) == "none"
    assert resolve_kind(config(), TORCHRUN) == "ddp"  # the Hugging Face Trainer's choice under torchrun
    assert resolve_kind(config(), ACCELERATE_FSDP) == "fsdp"
    assert resolve_kind(config(distributed="fsdp"), TORCHRUN) == "fsdp"
    assert resolve_kind(config(distributed="none"), {**TORCHRUN, "WORLD_SIZE": "1"}) == "none"
    lora = load_run_config("sst2_minilm_lora", {"batch_size": 4})  # a method without an allocator
    assert lora.adapter.allocator is None and resolve_kind(lora, ACCELERATE_FSDP) == "fsdp"


@pytest.mark.parametrize("overrides, env, message", [
    ({"distributed": "none"}, TORCHRUN, r"one of 2 processes \(WORLD_SIZE=2\) but distributed=none"),
    ({"distributed": "ddp"}, {}, r"distributed=ddp needs one process per device started by a launcher"),
    ({"batch_size": 5}, TORCHRUN, r"batch_size=5 is the global micro-batch .* use a multiple of 2"),
    ({"adapter.allocator.compact": "final"}, TORCHRUN, r"compact='final' cuts the factors' storage, which DDP"),
    ({"distributed": "fsdp", "export": "peft"}, TORCHRUN,
     r"export=peft reads the whole model .* `hyperadalora export RUN_DIR`"),
    ({}, {**ACCELERATE_FSDP, "FSDP_VERSION": "1"}, r"FSDP version 1; hyperadalora shards with FSDP2"),
    ({}, {**ACCELERATE_FSDP, "FSDP_OFFLOAD_PARAMS": "true"}, r"fsdp_offload_params: true is not supported"),
    ({}, {**ACCELERATE_FSDP, "ACCELERATE_MIXED_PRECISION": "bf16"}, r"mixed_precision is bf16 .* add precision=bf16"),
    ({}, {**TORCHRUN, "ACCELERATE_USE_DEEPSPEED": "true"}, r"accelerate launched DeepSpeed"),
])
def test_a_launch_it_cannot_honour_is_refused_with_the_fix(overrides, env, message):
    with pytest.raises(ValueError, match=message):
        resolve_kind(config(**overrides), env)


def test_one_process_trains_on_the_gpu_when_there_is_one_unless_device_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as torch would report it
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    moved = []
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(model, "to", lambda device: moved.append(device))
    SingleProcess(config()).wrap(model)  # device=auto: the Hugging Face Trainer's choice
    SingleProcess(config(device="cpu")).wrap(model)
    SingleProcess(config(device="cuda", quantize="4bit")).wrap(model)  # a quantised base loads on its device
    assert moved == [torch.device("cuda", 0)]


def test_device_cuda_without_a_gpu_is_refused_before_anything_loads(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device=cuda, but torch sees no CUDA device"):
        resolve_kind(config(device="cuda"), {})
    assert SingleProcess(config()).device is None
    with pytest.raises(ValueError, match="device"):
        config(device="tpu")


def test_device_cpu_loads_a_quantised_base_on_the_cpu(monkeypatch):
    from hyperadalora import models
    from hyperadalora.train.build import load_base_model

    seen = []
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: seen.append(kw.get("device")))
    load_base_model(config(device="cpu", quantize="4bit"))
    load_base_model(config(quantize="4bit"))
    assert seen == ["cpu", None]  # None: the current GPU when there is one (models.load_model)


def test_ranks_split_each_global_batch_without_overlap():
    world = []
    for rank in range(3):
        part = SingleProcess(config())
        part.rank, part.world_size = rank, 3
        world.append(part.rows(list(range(100, 112))))
    assert sorted(sum(world, [])) == list(range(100, 112)) and all(len(r) == 4 for r in world)


def test_distributed_ddp_without_a_launcher_is_refused_before_anything_is_written(shared, tmp_path, capsys):
    code = main(tiny_args(shared, tmp_path / "one", "distributed=ddp"))
    assert code == 2 and "distributed=ddp needs one process per device" in capsys.readouterr().err
    assert not (tmp_path / "one").exists()  # refused before anything was written


# -- end to end: torchrun -m hyperadalora.cli train ------------------------------------------------

@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return {"bert": tiny_bert_dir(root), "llama": tiny_llama_dir(root),
            "data": write_instruct(write_rte(root / "data", train_rows=32))}


def tiny_args(shared, out: Path, *extra: str) -> list[str]:
    return ["train", "rte_minilm_adalora", "--data-dir", str(shared["data"]), "--output-dir", str(out),
            "--no-progress", f"model={shared['bert']}", "run_name=run", "steps=6", "batch_size=4", "eval_every=3",
            "save_every=3", "adapter.target_modules=[query,value]", "adapter.allocator.target_r=4",
            "adapter.allocator.tinit=1", "adapter.allocator.tfinal=1", "adapter.allocator.deltaT=1", *extra]


def two_processes(args: list[str]) -> str:
    return torchrun_two_ranks(["-m", "hyperadalora.cli", *args], timeout=300)


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def assert_same_run(one: Path, two: Path, tol: float) -> None:
    a, b = log(one), log(two)
    assert [r["step"] for r in b] == list(range(1, 7))  # one line per step: rank 0 alone writes
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= tol and abs(x["grad_norm"] - y["grad_norm"]) <= tol * 10
        assert (x["total_rank"], x["budget"]) == (y["total_rank"], y["budget"])
        assert ("eval_loss" in x) == ("eval_loss" in y) and abs(x.get("eval_loss", 0) - y.get("eval_loss", 0)) <= tol
    wa, wb = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (one, two))
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= tol
    ea, eb = (json.loads((run / "eval.json").read_text()) for run in (one, two))
    assert ea["final"]["accuracy"] == eb["final"]["accuracy"]
    assert (ea["processes"], eb["processes"]) == (1, 2)


@pytest.mark.parametrize("kind, source, accumulate", [("ddp", "direct", 2), ("fsdp", "hyper", 1)])
def test_two_processes_train_as_one_on_the_same_global_batch(shared, tmp_path, capsys, kind, source, accumulate):
    """DDP with 2 micro-batches per step (all-reduced once, no_sync for the first) and FSDP2."""
    extra = [f"adapter.source={source}", f"grad_accum={accumulate}", "eval_loss_every=2"]
    assert main(tiny_args(shared, tmp_path / "one", *extra)) == 0
    stdout = two_processes(tiny_args(shared, tmp_path / "two", *extra, f"distributed={kind}"))
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    assert_same_run(one, two, 1e-5)
    assert len(log(one)) == 6 and log(one)[-1]["total_rank"] < log(one)[0]["total_rank"]  # it pruned
    assert [r["step"] for r in log(two) if "eval_loss" in r] == [2, 4, 6]  # the held-out loss, rank 0's line
    assert stdout.count('"status": "completed"') == 1  # rank 0 reports, once
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["run"]
    assert (two / "config.yaml").read_text().count(f"distributed: {kind}") == 1
    step = two / "checkpoints" / "step-3"
    assert (step / "rng.safetensors").is_file() and (step / "rng-rank1.safetensors").is_file()


def test_fsdp_resumes_exactly_on_two_or_one_processes(shared, tmp_path):
    """A run stopped after its step-3 checkpoint (its later checkpoint and eval.json gone, log lines
    4-6 left behind as a kill would) continues to the uninterrupted run's losses and adapter."""
    args = tiny_args(shared, tmp_path / "full", "adapter.source=hyper", "distributed=fsdp")
    two_processes(args)
    full = tmp_path / "full" / "run"
    for name, command in (("two", None), ("one", ["distributed=none"])):
        run = tmp_path / name / "run"
        shutil.copytree(full, run)
        shutil.rmtree(run / "checkpoints" / "step-6")
        (run / "eval.json").unlink()
        resume = ["train", "--resume", str(run), "--no-progress"]
        if command is None:
            two_processes(resume)
        else:
            assert main(resume + command) == 0
        a, b = log(full), log(run)
        assert [r["step"] for r in b] == list(range(1, 7))
        assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= (0.0 if name == "two" else 1e-6)
        wa, wb = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (full, run))
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= (0.0 if name == "two" else 1e-6)


def test_fsdp_generation_task_evaluates_like_one_process(shared, tmp_path):
    """generate() calls the base model past the sharded root's forward: the root is gathered first.
    The sharded run also takes its loss in chunks (loss_chunk_tokens, the output layer called past the
    model's own forward, recomputed in the backward): the same losses as one process's own loss."""
    args = ["train", "alpaca_smollm2_adalora", "--data-dir", str(shared["data"]), "--no-progress",
            f"model={shared['llama']}", "run_name=run", "steps=3", "batch_size=2", "eval_rows=3", "max_new_tokens=4",
            "eval_loss_every=1"]
    assert main(args + ["--output-dir", str(tmp_path / "one")]) == 0
    two_processes(args + ["--output-dir", str(tmp_path / "two"), "distributed=fsdp", "loss_chunk_tokens=5"])
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    for x, y in zip(log(one), log(two)):
        assert abs(x["loss"] - y["loss"]) <= 1e-5
        assert abs(x["eval_loss"] - y["eval_loss"]) <= 1e-5  # every rank runs the sharded forward
    rows = [[json.loads(line)["generation"] for line in (r / "predictions.jsonl").read_text().splitlines()]
            for r in (one, two)]
    assert rows[0] == rows[1] and len(rows[0]) == 3
    assert torch.isfinite(torch.tensor(json.loads((two / "eval.json").read_text())["final"]["rouge1"]))


@pytest.mark.parametrize("flags, plugin", [({"is_fsdp_enabled": True}, "FSDP"),
                                           ({"is_deepspeed_enabled": True}, "DeepSpeed")])
def test_a_trainer_that_accelerate_would_shard_is_refused(flags, plugin):
    """transformers' Trainer sets these flags from accelerate's plugin (only with several processes)."""
    from types import SimpleNamespace

    from hyperadalora.integrations.trainer import refuse_foreign_sharding

    refuse_foreign_sharding(SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=False))  # DDP: accepted
    with pytest.raises(ValueError, match=rf"under accelerate's {plugin} plugin .* distributed=fsdp"):
        refuse_foreign_sharding(SimpleNamespace(**flags))


def test_accelerate_launch_with_the_example_fsdp_config_shards_like_torchrun(shared, tmp_path):
    """`accelerate launch --config_file examples/accelerate_fsdp.yaml -m hyperadalora.cli train ...` (its
    use_cpu switched on for this machine): distributed=auto becomes fsdp and trains as one process does."""
    import os
    import subprocess
    import sys

    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate's launcher is not installed beside this Python")
    example = Path(__file__).resolve().parents[2] / "examples" / "accelerate_fsdp.yaml"
    text = example.read_text()
    assert "distributed_type: FSDP" in text and "fsdp_version: 2" in text and "use_cpu: false" in text
    config = tmp_path / "accelerate_cpu.yaml"
    config.write_text(text.replace("use_cpu: false", "use_cpu: true"))
    args = tiny_args(shared, tmp_path / "acc", "adapter.source=hyper")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    done = subprocess.run([str(accelerate), "launch", "--config_file", str(config), "-m", "hyperadalora.cli", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert main(tiny_args(shared, tmp_path / "one", "adapter.source=hyper")) == 0
    two, one = tmp_path / "acc" / "run", tmp_path / "one" / "run"
    assert "distributed: fsdp" in (two / "config.yaml").read_text()
    assert_same_run(one, two, 1e-5)
