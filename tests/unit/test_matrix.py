"""One matrix: every registered method x factor source x tiny architecture through the same checks.

Rows come from ``METHOD_REGISTRY`` (a new method joins every check, and fails the frozen check
until its values are computed), the two sources and three tiny architectures (BERT classifier,
Llama with grouped-query attention, GPT-2 with ``Conv1D``). Each row is trained once (AdamW,
``MATRIX_STEPS`` steps with the full training contract; AdaLoRA prunes from step 2) and reused:

* step 0 (method x arch): the hyper model equals its direct twin of the same seed (train-mode
  loss with AdaLoRA's regulariser, eval logits, the exported peft tensors);
* merge / unmerge, save / load, peft export round trip (method x source x arch);
* resume after a kill (method x source, tiny BERT only: a ``train()`` run costs ~3 s of CPU,
  most of it its plots, so the other architectures would triple the file's time);
* DDP (method x source, tiny BERT, one ``torchrun`` of 2 gloo processes): both ranks stay in
  sync and equal one process on the whole batch;
* frozen hyper-path losses (method, tiny BERT): literals computed once by a plain-torch
  reference of the hypernetwork and the adapters (``reference_hyper_run``), see ``FROZEN``.

As a script: ``python tests/unit/test_matrix.py frozen`` recomputes and prints ``FROZEN``
(after checking the reference against the library); ``... ddp-worker OUT`` is the torchrun worker.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # when run as a script (torchrun, recompute)

import peft  # noqa: E402  (a test dependency: the matrix never skips)

import hyperadalora as ha  # noqa: E402
from hyperadalora.export import export_peft_lora  # noqa: E402
from hyperadalora.integrations.distributed import assert_in_sync, wrap_ddp  # noqa: E402
from hyperadalora.methods import METHOD_REGISTRY  # noqa: E402
from hyperadalora.train import load_run, train  # noqa: E402
from tiny_models import (BERT_TARGETS, GPT2_TARGETS, LLAMA_TARGETS, bert_batch, contract_step,  # noqa: E402
                         llama_batch, tiny_bert, tiny_gpt2, tiny_llama, train_steps)

HERE = Path(__file__).resolve().parent
METHODS = list(METHOD_REGISTRY)
# Rows that differ from a method's default by an init (``method+init``); PiSSA joined with this one line.
INIT_VARIANTS = ["lora+pissa", "dora+pissa"]
VARIANTS = METHODS + INIT_VARIANTS
SOURCES = ["direct", "hyper"]
# arch: (builder, batch function, target modules, modules_to_save)
ARCHS = {
    "bert": (tiny_bert, bert_batch, BERT_TARGETS, ("classifier",)),
    "llama": (tiny_llama, llama_batch, LLAMA_TARGETS, ()),
    "gpt2": (tiny_gpt2, llama_batch, GPT2_TARGETS, ()),
}
MATRIX_STEPS, MATRIX_LR = 6, 1e-2
SMALL_HYPER = ha.HyperConfig(hidden=24, layers=1)

each_method = pytest.mark.parametrize("method", METHODS)
each_row = pytest.mark.parametrize("arch,source,method", [(a, s, m) for a in ARCHS for s in SOURCES for m in VARIANTS])
each_variant = pytest.mark.parametrize("method", VARIANTS)
each_source = pytest.mark.parametrize("source", SOURCES)
each_arch = pytest.mark.parametrize("arch", list(ARCHS))


def matrix_config(arch: str, method: str, source: str) -> ha.AdapterConfig:
    """The adapter of one matrix row (``method`` or ``method+init``); an allocating method prunes from
    step 2 to an average rank of 2."""
    _, _, targets, heads = ARCHS[arch]
    method, _, init = method.partition("+")
    alloc = ({"allocator": ha.AllocatorConfig(total_step=MATRIX_STEPS, target_r=2, tinit=1, tfinal=2)}
             if METHOD_REGISTRY[method].uses_allocator else {})
    return ha.AdapterConfig(method=method, source=source, r=4, lora_alpha=8.0, seed=7, target_modules=targets,
                            modules_to_save=heads, hyper=SMALL_HYPER, init=init or "default", **alloc)


@functools.cache
def trained(arch: str, method: str, source: str) -> tuple[nn.Module, ha.AdaptedModel]:
    """``(base, model)``: the row's model after ``MATRIX_STEPS`` steps, in eval mode (do not mutate)."""
    build, batch_fn, _, _ = ARCHS[arch]
    base = build()
    model = ha.wrap(copy.deepcopy(base), matrix_config(arch, method, source))
    train_steps(model, MATRIX_STEPS, batch_fn, lr=MATRIX_LR)
    return base, model.eval()


def inputs(arch: str, seed: int = 11) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ARCHS[arch][1](seed).items() if k != "labels"}


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.eval()(**batch).logits


def assert_adapted(arch: str, base: nn.Module, model: nn.Module) -> torch.Tensor:
    """The trained adapter really changes the outputs (so equalities below cannot hold trivially)."""
    ours = logits(model, inputs(arch))
    assert (logits(copy.deepcopy(base), inputs(arch)) - ours).abs().max() > 1e-4
    return ours


# ----------------------------------------------------------------------------------- step 0
@each_arch
@each_variant
def test_step0_hyper_equals_its_direct_twin(arch, method, tmp_path):
    build, batch_fn, _, _ = ARCHS[arch]
    base = build()
    twins = {s: ha.wrap(copy.deepcopy(base), matrix_config(arch, method, s)) for s in SOURCES}
    batch = batch_fn(0)
    with torch.no_grad():
        train_loss = {s: m.train()(**batch).loss for s, m in twins.items()}  # AdaLoRA: + gamma * regulariser
        eval_loss = {s: m.eval()(**batch).loss for s, m in twins.items()}
    torch.testing.assert_close(train_loss["hyper"], train_loss["direct"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits(twins["hyper"], batch), logits(twins["direct"], batch), rtol=1e-6, atol=1e-7)
    exported = {s: load_file(str(export_peft_lora(m, tmp_path / s) / "adapter_model.safetensors"))
                for s, m in twins.items()}
    assert exported["hyper"].keys() == exported["direct"].keys()
    for key, value in exported["direct"].items():
        torch.testing.assert_close(exported["hyper"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    # Not 0 == 0: the factors are non-zero (LoRA's A) or the regulariser sees them (AdaLoRA's P, Q).
    random_a = any(v.abs().max() > 0 for k, v in exported["direct"].items() if "lora_A" in k)
    assert random_a or (train_loss["direct"] - eval_loss["direct"]).abs() > 1e-6


# ------------------------------------------------------------------------ merge / save / export
@each_row
def test_merge_equals_unmerged_and_unmerge_restores_the_weights(arch, method, source):
    base, trained_model = trained(arch, method, source)
    model = copy.deepcopy(trained_model)
    ours = assert_adapted(arch, base, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.merge()
        merged = logits(model, inputs(arch))
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        model.unmerge()
    assert changed, "merging must change the base weights"
    torch.testing.assert_close(merged, ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(model, inputs(arch)), ours, rtol=1e-4, atol=1e-5)
    after = model.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=1e-6, msg=key)


@each_row
def test_save_load_onto_a_fresh_base_gives_the_same_outputs(arch, method, source, tmp_path):
    base, model = trained(arch, method, source)
    ours = assert_adapted(arch, base, model)
    model.save_adapter(tmp_path / "adapter")
    loaded = ha.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    assert torch.equal(logits(loaded, inputs(arch)), ours)
    assert loaded.rank_pattern == model.rank_pattern and loaded.budget == model.budget
    if METHOD_REGISTRY[method.partition("+")[0]].uses_allocator:  # the masks are the pruned ones, not all-kept
        assert sum(loaded.ranks.values()) == 2 * len(loaded.ranks)


@each_row
def test_peft_export_loads_in_peft_with_the_same_outputs(arch, method, source, tmp_path):
    base, model = trained(arch, method, source)
    ours = assert_adapted(arch, base, model)
    export_peft_lora(model, tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    torch.testing.assert_close(logits(peft_model, inputs(arch)), ours, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ resume
@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    from test_train_loop import tiny_bert_dir, write_rte

    root = tmp_path_factory.mktemp("matrix_resume")
    return {"bert": tiny_bert_dir(root), "data": write_rte(root / "data")}


def resume_overrides(method: str, source: str) -> list[str]:
    """Overrides of the ``rte_minilm_adalora`` preset for one row (adapter dropout on, so that the
    restored torch RNG matters)."""
    adapter = [] if method == "adalora" else [f"adapter.method={method}", "adapter.allocator=null", "adapter.r=4"]
    hyper = ["adapter.source=hyper", "adapter.hyper.hidden=16"] if source == "hyper" else []
    return ["steps=4", "eval_every=0", "save_every=2", "adapter.lora_dropout=0.1", *adapter, *hyper]


@each_source
@each_method
def test_killed_and_resumed_run_gives_the_uninterrupted_losses(run_files, tmp_path, method, source):
    from test_resume import assert_same_run, crash_run
    from test_train_loop import read_jsonl, rte_config

    overrides = resume_overrides(method, source)
    ref = train(rte_config(run_files, tmp_path, "run_name=ref", *overrides)).run_dir
    run = crash_run(run_files, rte_config(run_files, tmp_path, "run_name=run", *overrides), crash_step=4)
    assert len(read_jsonl(run / "log.jsonl")) == 3  # killed in step 4; the checkpoint is step 2's
    result = train(load_run(run), resume=run)
    assert result.resumed_from_step == 2 and result.steps_done == 4
    assert_same_run(run, ref)


# --------------------------------------------------------------------------------- DDP
DDP_PER_RANK = 4


def ddp_train(method: str, source: str, world: int = 1, rank: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """Trains the BERT row of (method, source) on this rank's share of every global batch of
    ``2 * DDP_PER_RANK`` rows; returns (losses averaged over ranks and sync report, parameters)."""
    model = ha.wrap(tiny_bert(), matrix_config("bert", method, source))  # same seed on every rank
    forward = wrap_ddp(model) if world > 1 else model
    opt = torch.optim.AdamW(model.optimizer_param_groups(MATRIX_LR), lr=MATRIX_LR)
    model.train()
    losses = []
    for step in range(MATRIX_STEPS):
        batch = bert_batch(100 + step, batch=2 * DDP_PER_RANK)
        if world > 1:
            batch = {k: v[rank * DDP_PER_RANK:(rank + 1) * DDP_PER_RANK] for k, v in batch.items()}
        value = contract_step(model, batch, opt, step, forward)
        if world > 1:
            dist.all_reduce(value)
        losses.append(float(value) / world)
    error = None
    try:
        assert_in_sync(model)  # masks, hypernetwork states, allocator, DyLoRA rank, parameters
    except RuntimeError as exc:
        error = str(exc)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"losses": losses, "error": error, "rank_pattern": model.rank_pattern}, params


def ddp_worker_main(out_dir: str) -> None:
    """torchrun entry point: every (method, source) row on this rank; writes ``rank<k>.json`` and
    ``rank<k>.safetensors`` (trainable parameters) into ``out_dir``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=180))
    rank, world = dist.get_rank(), dist.get_world_size()
    report, tensors = {}, {}
    for method in METHODS:
        for source in SOURCES:
            report[f"{method}-{source}"], params = ddp_train(method, source, world, rank)
            tensors.update({f"{method}-{source}/{n}": p.contiguous() for n, p in params.items()})
    save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"world": world, "results": report}, fh)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.fail("torch.distributed with the gloo backend is required")
    out = tmp_path_factory.mktemp("matrix_ddp")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = ([str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", "--nproc_per_node", "2", str(Path(__file__).resolve()), "ddp-worker", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parents[1] / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(HERE),
                            start_new_session=True)  # a session of its own: a timeout ends the workers too
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2]
    return [r["results"] for r in reports], [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]


@each_source
@each_method
def test_ddp_ranks_stay_in_sync_and_equal_one_process(ddp_results, method, source):
    (reports, tensors), name = ddp_results, f"{method}-{source}"
    ref, ref_params = ddp_train(method, source)
    for rank, report in enumerate(r[name] for r in reports):
        assert report["error"] is None, f"rank {rank}: {report['error']}"
        torch.testing.assert_close(torch.tensor(report["losses"], dtype=torch.float64),
                                   torch.tensor(ref["losses"], dtype=torch.float64), rtol=0, atol=1e-5)
        assert report["rank_pattern"] == ref["rank_pattern"]
    assert ref["losses"][-1] != ref["losses"][0]
    for pname, value in ref_params.items():
        key = f"{name}/{pname}"
        assert torch.equal(tensors[0][key], tensors[1][key]), f"{key} differs between ranks"
        # 5e-5: AdamW divides by sqrt(v), so a near-zero gradient's rounding (the ranks sum their halves)
        # can move one element by ~1e-5 in 6 steps; an unsynchronised rank would be ~lr (1e-2) off.
        torch.testing.assert_close(tensors[0][key], value, rtol=0, atol=5e-5, msg=lambda m: f"{key}: {m}")


# ------------------------------------------------------------------- frozen hyper-path values
# The hyper source on tiny BERT (BERT_TARGETS, r=4, lora_alpha=8, seed 7, hidden 24, 1 attention
# layer, tokens="rank", mode="anchored"; AdaLoRA with gamma=0.1 and no pruning in these steps):
# the training losses of ``FROZEN_STEPS`` AdamW steps (lr ``FROZEN_LR``, no weight decay) on
# bert_batch(0..5), then the eval-mode loss on bert_batch(9). Computed once by
# ``reference_hyper_run`` below: plain torch, with the hypernetwork (token cut, in_proj, context
# embeddings, the BERT body layer, out_proj, ``F = S0 + H(S) / sqrt(hidden)``, ``S <- F``) and each
# method's adapted weight re-implemented with explicit matmuls from the wrapped model's initial
# tensors, the base BERT run on the merged weights through torch.func.functional_call, and
# torch's AdamW. At commit ba7dcaa (and again at main 3055c8e, after the source refactor) the
# library agreed with it to 6.1e-7 relative (DyLoRA; 0 for the others); the reference moves by
# 3e-5 to 4e-2 when a context embedding, the mode or a LayerNorm is changed (1e-6 to 4e-6 for the
# body's head count), hence ``rtol=2e-6``.
# Recompute (after a deliberate change): ``PYTHONPATH=src python tests/unit/test_matrix.py frozen``.
FROZEN_STEPS, FROZEN_LR, FROZEN_SEED, FROZEN_R, FROZEN_ALPHA, FROZEN_GAMMA = 6, 1e-2, 7, 4, 8.0, 0.1
FROZEN: dict[str, list[float]] = {  # method: [train loss at steps 0..5 (AdaLoRA: + regulariser), eval loss]
    "lora": [0.6905523538589478, 0.6718428730964661, 0.810329794883728, 0.6915650367736816, 0.6829299330711365,
             0.7073278427124023, 0.6830631494522095],
    "adalora": [0.887770414352417, 0.8724279403686523, 0.8718747496604919, 0.8821030855178833, 0.8555766940116882,
                0.8732962608337402, 0.684941828250885],
    "dora": [0.6905523538589478, 0.6759762763977051, 0.7439521551132202, 0.6921961307525635, 0.682680606842041,
             0.7149963974952698, 0.6876958012580872],
    "dylora": [0.6905523538589478, 0.6548514366149902, 0.7701506614685059, 0.6859013438224792, 0.6946561336517334,
               0.7122883796691895, 0.6874958872795105],
}


def frozen_config(method: str) -> ha.AdapterConfig:
    alloc = ({"allocator": ha.AllocatorConfig(total_step=20, target_r=2, tinit=10, tfinal=5)}
             if method == "adalora" else {})
    return ha.AdapterConfig(method=method, source="hyper", r=FROZEN_R, lora_alpha=FROZEN_ALPHA, gamma=FROZEN_GAMMA,
                            seed=FROZEN_SEED, target_modules=BERT_TARGETS, hyper=SMALL_HYPER, **alloc)


def library_hyper_run(method: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The library's losses (see ``FROZEN``) and the wrapped model's initial tensors."""
    model = ha.wrap(tiny_bert(), frozen_config(method))
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.optimizer_param_groups(FROZEN_LR), lr=FROZEN_LR)  # weight decay 0
    model.train()
    losses = [contract_step(model, bert_batch(step), opt, step).item() for step in range(FROZEN_STEPS)]
    with torch.no_grad():
        losses.append(model.eval()(**bert_batch(9)).loss.item())
    return losses, init


@each_method
def test_hyper_path_losses_equal_the_frozen_reference(method):
    assert method in FROZEN, f"no frozen values for {method!r}: run `python tests/unit/test_matrix.py frozen`"
    got, _ = library_hyper_run(method)
    with torch.no_grad():
        untrained = tiny_bert().eval()(**bert_batch(9)).loss.item()
    assert abs(got[-1] - untrained) > 1e-4, "the generated adapters must have moved the eval loss"
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                               torch.tensor(FROZEN[method], dtype=torch.float64), rtol=2e-6, atol=0)


def _ref_layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _ref_attention_layer(x: torch.Tensor, p: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """One post-LayerNorm BERT layer (exact GELU), written out."""
    n, t, h = x.shape
    hd = h // heads
    qkv = x @ p["qkv.weight"].T + p["qkv.bias"]  # (n, t, 3h): q | k | v, heads inside each
    # (n, heads, t, hd) each
    q, k, v = (qkv[..., i * h:(i + 1) * h].reshape(n, t, heads, hd).transpose(1, 2) for i in range(3))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v  # (n, heads, t, hd)
    x = _ref_layer_norm(x + att.transpose(1, 2).reshape(n, t, h) @ p["attn_out.weight"].T + p["attn_out.bias"],
                        p["ln1.weight"], p["ln1.bias"])
    hidden = x @ p["ffn_in.weight"].T + p["ffn_in.bias"]
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return _ref_layer_norm(x + hidden @ p["ffn_out.weight"].T + p["ffn_out.bias"], p["ln2.weight"], p["ln2.bias"])


def _ref_generate(kind: str, state: torch.Tensor, anchor: torch.Tensor, ids: list[int],
                  p: dict[str, torch.Tensor]) -> torch.Tensor:
    """``F = anchor + scale * out(body(in(tokens) + module_emb + rank_emb)))`` with one token per
    rank component (P, B transposed; lam a column)."""
    view = state[..., None] if kind == "lam" else state.transpose(1, 2) if kind in ("P", "B") else state
    n, r, d = view.shape  # (modules, rank, width): the tokens
    x = view @ p[f"in_proj.{d}.weight"].T + p[f"in_proj.{d}.bias"]  # (n, r, h)
    x = x + p["module_emb"][torch.tensor(ids)][:, None, :] + p["rank_emb"][:r][None]
    heads = 12  # build_body: 12 heads when the width divides by 12
    body = {k[len("body.0."):]: v for k, v in p.items() if k.startswith("body.0.")}
    out = (_ref_attention_layer(x, body, heads) @ p[f"out_proj.{d}.weight"].T + p[f"out_proj.{d}.bias"])
    out = out * SMALL_HYPER.hidden ** -0.5  # (n, r, d)
    delta = out[..., 0] if kind == "lam" else out.transpose(1, 2) if kind in ("P", "B") else out
    return anchor + delta


def _ref_weight(method: str, w0: torch.Tensor, f: dict[str, torch.Tensor], magnitude: torch.Tensor | None,
                rank: int) -> torch.Tensor:
    """The adapted weight: LoRA / DyLoRA (first ``rank`` components), AdaLoRA's SVD form, DoRA."""
    if method == "adalora":
        return w0 + FROZEN_ALPHA / (FROZEN_R + 1e-5) * f["P"] @ torch.diag(f["lam"]) @ f["Q"]
    v = w0 + FROZEN_ALPHA / rank * f["B"][:, :rank] @ f["A"][:rank]
    if method == "dora":  # the row norm is a constant (DoRA section 4.3)
        return (magnitude / torch.linalg.norm(v, dim=1).detach())[:, None] * v
    return v


def _ref_loss(method, base, names, factors, params, batch, rank, training) -> torch.Tensor:
    weights = {f"{n}.weight": _ref_weight(method, base.get_submodule(n).weight, factors[i],
                                          params.get(f"model.{n}.magnitude"), rank)
               for i, n in enumerate(names)}
    loss = torch.func.functional_call(base, weights, args=(), kwargs=batch).loss
    if method == "adalora" and training:  # peft's regulariser: mean of ||P^T P - I||_F, ||Q Q^T - I||_F
        eye = torch.eye(FROZEN_R)
        norms = [torch.linalg.norm(g - eye) for f in factors for g in (f["P"].T @ f["P"], f["Q"] @ f["Q"].T)]
        loss = loss + FROZEN_GAMMA * torch.stack(norms).mean()
    return loss


def _ref_groups(base: nn.Module, method: str) -> tuple[list[str], dict[tuple[str, tuple[int, ...]], list[int]]]:
    """The targeted linears in model order, and the module indices of each (kind, shape) group."""
    names = [n for n, m in base.named_modules()
             if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in BERT_TARGETS)]
    kinds = ("P", "lam", "Q") if method == "adalora" else ("A", "B")
    groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for i, n in enumerate(names):
        d_out, d_in = base.get_submodule(n).weight.shape
        shapes = {"P": (d_out, FROZEN_R), "lam": (FROZEN_R,), "Q": (FROZEN_R, d_in), "A": (FROZEN_R, d_in),
                  "B": (d_out, FROZEN_R)}
        for kind in kinds:
            groups.setdefault((kind, shapes[kind]), []).append(i)
    return names, groups


def _ref_source_prefix(init: dict[str, torch.Tensor]) -> str:
    """Where the factor source sits in the wrapped model's state dict (``hyper.``, ``source.``, ...)."""
    return next(k for k in init if not k.startswith("model.") and ".nets." in k).split("nets.")[0]


def _ref_tensor(init: dict[str, torch.Tensor], what: str, key: tuple[str, tuple[int, ...]]) -> torch.Tensor:
    """A group's ``state`` or ``anchor`` buffer, e.g. ``<source>.state_P_32x4``."""
    return init[f"{_ref_source_prefix(init)}{what}_{key[0]}_{'x'.join(map(str, key[1]))}"]


def _ref_generate_all(groups, states, init, params, n_layers: int) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """Every group's generated factor, and the same sliced per layer."""
    factors: list[dict[str, torch.Tensor]] = [{} for _ in range(n_layers)]
    generated = {}
    for key, ids in groups.items():
        prefix = f"{_ref_source_prefix(init)}nets.{key[0]}."
        net = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
        generated[key] = _ref_generate(key[0], states[key], _ref_tensor(init, "anchor", key), ids, net)
        for pos, i in enumerate(ids):
            factors[i][key[0]] = generated[key][pos]
    return factors, generated


def reference_hyper_run(method: str, init: dict[str, torch.Tensor]) -> list[float]:
    """Plain-torch re-implementation of ``library_hyper_run`` from the wrapped model's initial tensors."""
    base = tiny_bert().requires_grad_(False)
    names, groups = _ref_groups(base, method)
    states = {key: _ref_tensor(init, "state", key).clone() for key in groups}
    params = {k: v.clone().requires_grad_(True) for k, v in init.items()
              if k.startswith(_ref_source_prefix(init) + "nets.") or k.endswith(".magnitude")}
    draws = torch.Generator().manual_seed(FROZEN_SEED)  # DyLoRA: b ~ U{1..r} at wrap and after each step
    rank = int(torch.randint(1, FROZEN_R + 1, (1,), generator=draws)) if method == "dylora" else FROZEN_R
    opt = torch.optim.AdamW(list(params.values()), lr=FROZEN_LR, weight_decay=0.0)
    losses = []
    for step in range(FROZEN_STEPS):
        factors, generated = _ref_generate_all(groups, states, init, params, len(names))
        loss = _ref_loss(method, base, names, factors, params, bert_batch(step), rank, True)
        loss.backward()
        opt.step()
        opt.zero_grad()
        states = {key: t.detach() for key, t in generated.items()}  # anchored mode: S <- F
        if method == "dylora":
            rank = int(torch.randint(1, FROZEN_R + 1, (1,), generator=draws))
        losses.append(loss.item())
    with torch.no_grad():
        factors, _ = _ref_generate_all(groups, states, init, params, len(names))
        losses.append(_ref_loss(method, base, names, factors, params, bert_batch(9), FROZEN_R, False).item())
    return losses


def recompute_frozen() -> None:
    """Prints ``FROZEN`` from the reference after checking it against the library (1 thread)."""
    torch.set_num_threads(1)
    for method in METHODS:
        got, init = library_hyper_run(method)
        ref = reference_hyper_run(method, init)
        worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
        print(f"# {method}: library vs reference, largest relative difference {worst:.2e}", file=sys.stderr)
        assert worst < 1e-6, (method, got, ref)
        print(f'    "{method}": [{", ".join(repr(v) for v in ref)}],')


if __name__ == "__main__":
    if sys.argv[1:2] == ["ddp-worker"]:
        ddp_worker_main(sys.argv[2])
    elif sys.argv[1:2] == ["frozen"]:
        recompute_frozen()
    else:
        sys.exit("usage: test_matrix.py frozen | ddp-worker OUT_DIR")
