"""Serving exports (issue 22 item 4): merged models, padded ranks, mixed-rank patterns, atomic writes.

References are independent of hyperadalora's forward: a merged model is loaded by transformers
alone (``AutoModelFor<Task>.from_pretrained``; once in a fresh interpreter that never imports
hyperadalora) and a padded or mixed-rank adapter by ``peft.PeftModel.from_pretrained``; both must
give the adapted model's eval outputs within float32 tolerance.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402

import hyperadalora as ha  # noqa: E402
from hyperadalora.export import export_peft_lora  # noqa: E402
from hyperadalora.export_merged import export_merged  # noqa: E402
from hyperadalora.methods import METHOD_REGISTRY  # noqa: E402
from hyperadalora.quant import QuantizedMergeError  # noqa: E402
from test_export import logits, peft_ranks, trained  # noqa: E402
from tiny_models import BERT_TARGETS, bert_batch, llama_batch, tiny_bert  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-6)
AUTO = {"bert": AutoModelForSequenceClassification, "llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM}


def inputs(batch_fn, seed=11):
    return {k: v for k, v in batch_fn(seed).items() if k != "labels"}


def siblings(path: Path) -> list[str]:
    """What lies beside ``path`` (a staging folder left behind would show here)."""
    return sorted(p.name for p in path.parent.iterdir()) if path.parent.exists() else []


def check_merged(base, model, batch_fn, directory, arch="bert"):
    """Merged export loaded by transformers alone gives our eval outputs; the model is unchanged."""
    batch = inputs(batch_fn)
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ours = logits(model, batch)
    model.train()
    assert export_merged(model, directory) == directory
    assert model.training and all(m.training for m in model.modules())  # modes restored
    for n, p in model.named_parameters():  # weights restored exactly (no unmerge rounding)
        torch.testing.assert_close(p.detach(), params_before[n], rtol=0, atol=0, msg=n)
    torch.testing.assert_close(logits(model, batch), ours, rtol=0, atol=0)
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors"} <= names and not any(n.startswith("adapter_") for n in names)
    loaded = AUTO[arch].from_pretrained(directory).eval()
    assert type(loaded) is type(base)
    torch.testing.assert_close(logits(loaded, batch), ours, **TOL)
    assert (logits(copy.deepcopy(base), batch) - ours).abs().max() > 1e-4, "the adapter must change the outputs"
    return loaded


# -- 1. merged models ------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["direct", "hyper"])
@pytest.mark.parametrize("method", list(METHOD_REGISTRY))
def test_merged_every_method_and_source(method, source, tmp_path):
    base, model, batch_fn = trained("bert", method, source)
    if method == "adalora":
        assert len(set(model.ranks.values())) > 1 and max(model.ranks.values()) < 6, "masked, mixed ranks"
    loaded = check_merged(base, model, batch_fn, tmp_path / "merged")
    torch.testing.assert_close(loaded.classifier.weight, model.model.classifier.weight.detach())  # trained head


@pytest.mark.parametrize("source", ["direct", "hyper"])
def test_merged_adalora_with_a_fully_pruned_module(source, tmp_path):
    base, model, batch_fn = trained("bert", "adalora", source)
    name = next(n for n, k in model.ranks.items() if k > 0)
    with torch.no_grad():
        model.adapted_layers[name].rank_mask.zero_()
        if source == "direct":
            model.adapted_layers[name].factors["lam"].zero_()
    assert model.ranks[name] == 0
    loaded = check_merged(base, model, batch_fn, tmp_path / "merged")
    torch.testing.assert_close(loaded.get_submodule(name).weight, base.get_submodule(name).weight, rtol=0, atol=0)


@pytest.mark.parametrize("arch,method", [("llama", "adalora"), ("gpt2", "dora")])
def test_merged_causal_lm_and_conv1d(arch, method, tmp_path):
    base, model, batch_fn = trained(arch, method, "direct")
    check_merged(base, model, batch_fn, tmp_path / "merged", arch)
    assert (tmp_path / "merged" / "generation_config.json").is_file()


@pytest.mark.parametrize("source", ["direct", "hyper"])
def test_merged_compacted_adalora(source, tmp_path):
    from test_compaction import run_pair

    ours, ref, _, _ = run_pair("adalora", source=source)
    assert sum(layer.r for layer in ours.layer_list) < sum(layer.r for layer in ref.layer_list), "compacted"
    batch = inputs(bert_batch)
    export_merged(ours, tmp_path / "merged")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(loaded, batch), logits(ours, batch), **TOL)
    torch.testing.assert_close(logits(loaded, batch), logits(ref, batch), **TOL)  # the uncompacted twin


def test_merged_model_loads_without_hyperadalora(tmp_path):
    base, model, batch_fn = trained("llama", "lora", "hyper", steps=4)
    export_merged(model, tmp_path / "merged")
    batch = inputs(batch_fn)
    torch.save(batch, tmp_path / "batch.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r}).eval()\n"
        f"batch = torch.load({str(tmp_path / 'batch.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(**batch).logits, {str(tmp_path / 'out.pt')!r})\n"
        "assert not any(m.split('.')[0] in ('hyperadalora', 'peft') for m in sys.modules), 'imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(theirs, logits(model, batch), **TOL)
    assert "auto_map" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_merged_refuses_a_merged_model_and_tied_weights(tmp_path):
    _, model, _ = trained("bert", "lora", "direct", steps=1)
    model.merge()
    with pytest.raises(ValueError, match="unmerge"):
        export_merged(model, tmp_path / "x")
    model.unmerge()
    with pytest.raises(TypeError, match="AdaptedModel"):
        export_merged(model.model, tmp_path / "x")
    from tiny_models import tiny_gpt2  # GPT-2 ties lm_head to the token embeddings

    tied = ha.wrap(tiny_gpt2(), ha.AdapterConfig(method="lora", r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="'lm_head' shares its weight"):
        export_merged(tied, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -- 1b. quantised bases ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    from tiny_models import tiny_llama

    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method,quantize", [("dora", "4bit"), ("lora", "8bit")])
def test_quantized_base_refused_unless_dequantized(saved_llama, method, quantize, tmp_path):
    pytest.importorskip("bitsandbytes")
    from test_quantized import quantized_llama
    from tiny_models import LLAMA_TARGETS

    model = ha.wrap(quantized_llama(saved_llama, quantize),
                    ha.AdapterConfig(method=method, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    with torch.no_grad():
        for layer in model.adapted_layers.values():
            layer.factors["B"].normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    batch = inputs(llama_batch)
    ours_quantized = logits(model, batch)
    out = tmp_path / "out" / "merged"
    with pytest.raises(QuantizedMergeError, match="--dequantize"):
        export_merged(model, out)
    assert not out.exists() and siblings(out) == []
    export_peft_lora(model, tmp_path / "peft")  # the reference's adapter, exported before dequantising
    with pytest.warns(UserWarning, match="dequantised .* in place"):
        export_merged(model, out, dequantize=True)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and siblings(out) == ["merged"]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(type(m).__name__ not in ("Linear4bit", "Linear8bitLt") for m in loaded.modules())
    # Reference: transformers' own dequantisation of a fresh quantised base, with peft's adapter.
    reference = peft.PeftModel.from_pretrained(quantized_llama(saved_llama, quantize).dequantize(), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, batch), logits(reference, batch), **TOL)
    if quantize == "4bit":  # the 4-bit CPU forward is dequantise-then-matmul: the same outputs
        torch.testing.assert_close(logits(loaded, batch), ours_quantized, rtol=1e-5, atol=1e-5)


# -- 2. padded ranks --------------------------------------------------------------------------------

def mixed_lora(method="lora"):
    """A LoRA with per-module ranks (what a sensitivity allocation writes), one module at rank 0."""
    pattern = {"layer.0.attention.self.query": 2, "layer.0.attention.self.key": 0, "layer.1.attention.self.value": 5}
    base = tiny_bert()
    config = ha.AdapterConfig(method=method, r=3, lora_alpha=8, seed=7, target_modules=BERT_TARGETS,
                              modules_to_save=("classifier",), rank_pattern=pattern)
    model = ha.wrap(copy.deepcopy(base), config)
    from tiny_models import train_steps

    train_steps(model, 6, bert_batch)
    return base, model


def load_peft(base, directory):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


@pytest.mark.parametrize("case", ["adalora-direct", "adalora-hyper", "lora-mixed", "dora-mixed"])
def test_padded_adapter_matches_in_peft(case, tmp_path):
    method, kind = case.split("-")
    if method == "adalora":
        base, model, _ = trained("bert", "adalora", kind)
        name = next(n for n, k in model.ranks.items() if k > 0)
        with torch.no_grad():  # a fully pruned module: left out, not padded
            model.adapted_layers[name].rank_mask.zero_()
            if kind == "direct":
                model.adapted_layers[name].factors["lam"].zero_()
    else:
        base, model = mixed_lora(method)
        name = "bert.encoder.layer.0.attention.self.key"
        assert name not in model.adapted_layers  # rank 0: never adapted
    ranks = {n: k for n, k in model.ranks.items() if k > 0}
    assert len(set(ranks.values())) > 1
    export_peft_lora(model, tmp_path / "padded", pad_rank=8)
    cfg = json.loads((tmp_path / "padded" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    peft_model = load_peft(base, tmp_path / "padded")
    assert peft_ranks(peft_model) == {n: 8 for n in ranks}
    assert name not in peft_ranks(peft_model)
    batch = inputs(bert_batch)
    torch.testing.assert_close(logits(peft_model, batch), logits(model, batch), **TOL)
    # ... and the unpadded export (rank_pattern / alpha_pattern) gives the same outputs in peft.
    export_peft_lora(model, tmp_path / "plain")
    plain = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert plain["rank_pattern"] == ranks and name not in plain["target_modules"]
    torch.testing.assert_close(logits(load_peft(base, tmp_path / "plain"), batch), logits(model, batch), **TOL)


def test_pad_rank_below_a_module_rank_is_refused_before_writing(tmp_path):
    _, model = mixed_lora()
    out = tmp_path / "out" / "padded"
    with pytest.raises(ValueError, match=r"module 'bert\.encoder\.layer\.1\.attention\.self\.value' has rank 5"):
        export_peft_lora(model, out, pad_rank=4)
    assert not out.parent.exists()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="pad_rank must be a positive int"):
            export_peft_lora(model, out, pad_rank=bad)
    export_peft_lora(model, out, pad_rank=5)  # exactly the largest rank: fine
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 5


# -- 3. nothing partial on failure; --force into an earlier export ----------------------------------

class _FailingTokenizer:
    def save_pretrained(self, directory):
        (Path(directory) / "tokenizer.json").write_text("{")  # half written ...
        raise OSError("disk full")


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    base, model, batch_fn = trained("bert", "lora", "direct", steps=2)
    before = logits(model, inputs(batch_fn))
    out = tmp_path / "merged"
    with pytest.raises(OSError, match="disk full"):
        export_merged(model, out, tokenizer=_FailingTokenizer())
    assert siblings(out) == []
    torch.testing.assert_close(logits(model, inputs(batch_fn)), before, rtol=0, atol=0)  # weights restored
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        export_merged(model, out, tokenizer=_FailingTokenizer())
    assert siblings(out) == ["merged"] and [p.name for p in out.iterdir()] == ["notes.txt"]
    import hyperadalora.export as export_module

    def broken(path, data, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "write_json", broken)  # the config, written after the tensors
    with pytest.raises(OSError, match="disk full"):
        export_peft_lora(model, tmp_path / "peft")
    assert siblings(out) == ["merged"]


def test_force_over_an_earlier_export_removes_its_stale_files(tmp_path):
    base, model, batch_fn = trained("bert", "lora", "direct", steps=2)
    out = tmp_path / "out"
    export_peft_lora(model, out)
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    export_merged(model, out)
    names = sorted(p.name for p in out.iterdir())
    assert "adapter_config.json" not in names and "model-00001-of-00002.safetensors" not in names
    assert "notes.txt" in names and "model.safetensors" in names
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    torch.testing.assert_close(logits(loaded, inputs(batch_fn)), logits(model, inputs(batch_fn)), **TOL)


# -- the command line -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    from test_cli_main import tiny_args
    from test_train_loop import tiny_bert_dir, write_rte

    from hyperadalora.cli import main

    root = tmp_path_factory.mktemp("serving")
    shared = {"bert": tiny_bert_dir(root), "data": write_rte(root / "data")}
    assert main(tiny_args(shared, root, "adapter.allocator.tinit=0", "adapter.allocator.tfinal=1")) == 0
    return shared, root / "run"


def test_cli_merged_and_padded(cli_run, tmp_path, capsys):
    from transformers import AutoTokenizer

    from hyperadalora.cli import main
    from hyperadalora.train import load_run, load_trained

    shared, run = cli_run
    capsys.readouterr()
    assert main(["export", str(run), "--merged", str(tmp_path / "m"), "--out", str(tmp_path / "p"),
                 "--pad-rank", "8"]) == 0
    assert json.loads(capsys.readouterr().out) == {"peft_adapter": str(tmp_path / "p"),
                                                   "merged_model": str(tmp_path / "m")}
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    batch = tokenizer(["a cat sat", "the dog ran far"], padding=True, return_tensors="pt")
    model, _ = load_trained(load_run(run, []), run / "adapter")
    ours = logits(model, dict(batch))
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(logits(merged, dict(batch)), ours, **TOL)
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["r"] == 8
    base = AutoModelForSequenceClassification.from_pretrained(shared["bert"])
    torch.testing.assert_close(logits(load_peft(base, tmp_path / "p"), dict(batch)), ours, **TOL)


def test_cli_refusals_write_nothing(cli_run, tmp_path, capsys):
    from hyperadalora.cli import main

    _, run = cli_run
    cases = [
        (["--out", str(tmp_path / "o"), "--dequantize"], "--dequantize applies to --merged"),
        (["--merged", str(tmp_path / "o"), "--pad-rank", "4"], "--pad-rank pads the peft adapter"),
        (["--out", str(tmp_path / "o"), "--pad-rank", "0"], "--pad-rank must be a positive rank"),
        (["--merged", str(tmp_path / "o"), "quantize=4bit"], "quantize=4bit.*pass --dequantize"),
        (["--out", str(tmp_path / "o"), "--pad-rank", "1"], "cannot pad to rank 1: module .* has rank"),
        (["--out", str(tmp_path / "o"), "--merged", str(tmp_path / "o")], "the same folder"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main(["export", str(run), *extra]) == 2, extra
        assert __import__("re").search(message, capsys.readouterr().err), (extra, message)
        assert sorted(p.name for p in tmp_path.iterdir()) == [], extra


def test_cli_dequantize_writes_a_full_precision_model(cli_run, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    from hyperadalora.cli import main
    from hyperadalora.train import load_run, load_trained

    _, run = cli_run
    with pytest.warns(UserWarning, match="dequantised"):
        assert main(["export", str(run), "quantize=4bit", "--merged", str(tmp_path / "m"), "--dequantize"]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert all(type(m).__name__ != "Linear4bit" for m in loaded.modules())
    quantized, _ = load_trained(load_run(run, ["quantize=4bit"]), run / "adapter")  # the adapter on the 4-bit base
    batch = inputs(bert_batch)
    torch.testing.assert_close(logits(loaded, batch), logits(quantized, batch), rtol=1e-5, atol=1e-5)


def test_merged_bf16_base_keeps_its_dtype_and_matches_peft_merge(tmp_path):
    base = tiny_bert().to(torch.bfloat16)
    model = ha.wrap(copy.deepcopy(base), ha.AdapterConfig(method="dora", r=4, lora_alpha=8, target_modules=BERT_TARGETS,
                                                          modules_to_save=("classifier",)))
    with torch.no_grad():
        for layer in model.adapted_layers.values():
            layer.factors["B"].normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    export_merged(model, tmp_path / "merged")
    export_peft_lora(model, tmp_path / "peft")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert loaded.dtype == torch.bfloat16
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    # Reference: peft's own merge into the bf16 weights (the same rounding of W0 + dW).
    reference = load_peft(base, tmp_path / "peft").merge_and_unload()
    batch = inputs(bert_batch)
    torch.testing.assert_close(logits(loaded, batch), logits(reference, batch))  # bf16 default tolerances
    assert (logits(loaded, batch).float() - logits(base, batch).float()).abs().max() > 1e-3
