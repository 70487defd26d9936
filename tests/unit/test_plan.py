"""The memory / FLOP planner against real models: parameter counts, saved activations, FLOPs."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, MPNetConfig

import hyperadalora as ha
from hyperadalora.cli import main
from hyperadalora.functional import lowrank_linear
from hyperadalora.models import resolve_model_path
from hyperadalora.plan import (PRESETS, PlanInputError, TrainSetup, count_adapters, hypernetwork_params, make_plan,
                               resolve_shape, shape_from_hf_config)
from hyperadalora.plan.activations import block_bytes_per_token

from tiny_models import bert_batch, llama_batch, tiny_bert, tiny_llama

# Published totals (the checkpoints' safetensors index "total_size" / 2 for bf16 weights).
PUBLISHED = {"llama-1b": 1_235_814_400, "llama-8b": 8_030_261_248, "llama-70b": 70_553_706_496}


def _config(model) -> dict:
    return json.loads(model.config.to_json_string())


def _tiny_mpnet():
    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=48, max_position_embeddings=66, num_labels=2,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return AutoModelForSequenceClassification.from_config(cfg)


def _adapter(method: str, source: str, **kw) -> ha.AdapterConfig:
    alloc = ha.AllocatorConfig(total_step=100, target_r=2) if method == "adalora" else None
    return ha.AdapterConfig(method=method, r=4, source=source, allocator=alloc, seed=0, **kw)


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama, _tiny_mpnet])
def test_param_counts_match_tiny_models(build):
    model = build()
    shape = shape_from_hf_config(_config(model), task="causal-lm" if "CausalLM" in type(model).__name__ else None)
    assert shape.param_counts()["total"] == sum(p.numel() for p in model.parameters())


def test_tied_and_qwen_shapes_match_models():
    for cfg in ({"model_type": "llama", "tie_word_embeddings": True},
                {"model_type": "qwen2", "tie_word_embeddings": False}):
        base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=40)
        from transformers import AutoConfig

        hf_cfg = AutoConfig.for_model(**base, **cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_cfg)
        shape = shape_from_hf_config(_config(model))
        assert shape.param_counts()["total"] == sum(p.numel() for p in model.parameters())


# The packaged MPNet's and SmolLM2's config.json (their folders are built on first use: unzip / GGUF
# conversion, too slow for a unit test); MiniLM's is read from its package.
PACKAGED = {
    "mpnet": {"model_type": "mpnet", "vocab_size": 30527, "hidden_size": 768, "num_hidden_layers": 12,
              "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 514,
              "relative_attention_num_buckets": 32, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1},
    "smollm2": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536,
                "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False},
}


@pytest.mark.parametrize("name", ["minilm", "mpnet", "smollm2"])
def test_param_counts_match_packaged_models(name):
    from transformers import AutoConfig

    if name == "minilm":
        try:
            path = resolve_model_path("minilm")
        except FileNotFoundError:
            pytest.skip("the packaged MiniLM is not installed")
        shape, hf_cfg = resolve_shape("minilm"), AutoConfig.from_pretrained(str(path))
    else:
        shape = shape_from_hf_config(PACKAGED[name], name=name)
        hf_cfg = AutoConfig.for_model(**PACKAGED[name])
    cls = AutoModelForCausalLM if shape.task == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = cls.from_config(hf_cfg)
    assert shape.param_counts()["total"] == sum(p.numel() for p in model.parameters())


def test_presets_match_published_totals():
    for name, total in PUBLISHED.items():
        assert PRESETS[name].param_counts()["total"] == total


@pytest.mark.parametrize("method", ["lora", "adalora", "dora"])
@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_adapter_and_hypernetwork_counts_match_wrapped_models(build, method):
    model = build()
    causal = "CausalLM" in type(model).__name__
    shape = shape_from_hf_config(_config(model), task="causal-lm" if causal else None)
    heads = () if causal else ("classifier",)
    direct_cfg = _adapter(method, "direct", modules_to_save=heads)
    direct = ha.wrap(build(), direct_cfg)
    counts = count_adapters(shape, direct_cfg)
    trainable = sum(p.numel() for p in direct.parameters() if p.requires_grad)
    assert counts.factor_params + counts.extra_params + counts.head_params == trainable
    for tokens in ("rank", "patch", "rows"):
        cfg = _adapter(method, "hyper", modules_to_save=heads, hyper=ha.HyperConfig(tokens=tokens, hidden=16))
        hyper = ha.wrap(build(), cfg)
        predicted = hypernetwork_params(count_adapters(shape, cfg), cfg.hyper)
        assert sum(predicted.values()) == sum(p.numel() for p in hyper.hypernetwork_parameters())
        assert predicted == {k: v for k, v in hyper.hyper.parameter_counts().items() if "." not in k}


def _saved_bytes(model, batch) -> int:
    """Bytes autograd saves in one training forward (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(seen.values())


def _tiny_bert_dropout():
    model = tiny_bert()
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.1
    return type(model)(model.config)


@pytest.mark.parametrize("build, batch_fn", [(tiny_llama, llama_batch), (tiny_bert, bert_batch),
                                             (_tiny_bert_dropout, bert_batch)])
def test_block_saved_bytes_match_autograd(build, batch_fn):
    """One more block adds exactly the planned saved bytes per token (fp32, LoRA on every linear)."""
    batch = batch_fn(0, batch=2, seq=16)
    sizes = []
    for layers in (2, 3):
        model = build()
        model.config.num_hidden_layers = layers
        model = type(model)(model.config)
        wrapped = ha.wrap(model, ha.AdapterConfig(r=4, seed=0, modules_to_save=() if build is tiny_llama
                                                  else ("classifier",)))
        wrapped.train()
        sizes.append(_saved_bytes(wrapped, batch))
    shape = shape_from_hf_config(_config(model), task="causal-lm" if build is tiny_llama else None)
    per_block = block_bytes_per_token(shape, rank_sum=4 * len(shape.block_linears()), seq=16, e=4)
    assert sizes[1] - sizes[0] == per_block * 2 * 16


def test_adapted_linear_flops_match_flop_counter():
    n, d_in, d_out, r = 64, 48, 40, 4
    x = torch.randn(n, d_in, requires_grad=True)
    w = torch.randn(d_out, d_in)
    a, b = torch.randn(r, d_in, requires_grad=True), torch.randn(d_out, r, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        lowrank_linear(x, w, None, a, b, 0.5).sum().backward()
    # Frozen weight: forward 2 N P and the input gradient 2 N P; adapter: 6 N r (d_in + d_out), of
    # which the two in-place addmm_ (forward t B^T into y, backward u A into dx) escape the counter.
    in_place = 2 * n * r * (d_out + d_in)
    assert counter.get_total_flops() + in_place == 4 * n * d_out * d_in + 6 * n * r * (d_in + d_out)


def test_block_flops_match_flop_counter():
    """One more Llama block adds the planned linear, adapter and attention FLOPs (torch's counter)."""
    batch = llama_batch(0, batch=2, seq=16)
    counted, plans = [], []
    for layers in (2, 3):
        model = tiny_llama()
        model.config.num_hidden_layers = layers
        model.config._attn_implementation = "eager"  # explicit matmuls the counter sees
        model = type(model)(model.config)
        cfg = ha.AdapterConfig(r=4, seed=0)
        wrapped = ha.wrap(model, cfg)
        with FlopCounterMode(display=False) as counter:
            wrapped(**batch).loss.backward()
        counted.append(counter.get_total_flops())
        shape = shape_from_hf_config(_config(model), task="causal-lm")
        plans.append(make_plan(shape, cfg, TrainSetup(batch=2, seq_len=16, precision="fp32")).flops)
    d = {k: plans[1][k] - plans[0][k] for k in plans[0]}
    # Eager attention computes the full (unmasked) score matrix, twice the causal count; the
    # counter misses the adapters' in-place addmm_ (a third of their FLOPs, see the test above).
    assert counted[1] - counted[0] == d["base_linears"] + d["adapters"] * 2 / 3 + 2 * d["attention"]


def test_sharding_divides_sharded_terms_only():
    shape = PRESETS["llama-8b"]
    cfg = ha.AdapterConfig(method="lora", r=16, source="hyper")
    one = make_plan(shape, cfg, TrainSetup(batch=8, seq_len=1024, gpus=1, micro_batch=1))
    four = make_plan(shape, cfg, TrainSetup(batch=8, seq_len=1024, gpus=4, micro_batch=1))
    for term in ("base_weights", "trainable_weights", "gradients", "optimizer"):
        assert four.memory[term] == pytest.approx(one.memory[term] / 4)
    for term in ("activations_blocks", "factor_states", "generated_factors", "hypernetwork_activations"):
        assert four.memory[term] == one.memory[term]
    assert one.memory["fsdp_buffers"] == 0 and four.memory["fsdp_buffers"] > 0
    assert four.setup.accumulation == 2 and one.setup.accumulation == 8
    # The model's FLOPs do not depend on the split; every device runs its own generations.
    assert four.flops["base_linears"] == one.flops["base_linears"]
    assert four.flops["hypernetworks"] == pytest.approx(one.flops["hypernetworks"] * 4 * 2 / 8)


def test_precision_and_checkpointing_terms():
    shape = PRESETS["llama-8b"]
    cfg = ha.AdapterConfig(r=16)
    bf16 = make_plan(shape, cfg, TrainSetup(precision="bf16"))
    nf4 = make_plan(shape, cfg, TrainSetup(precision="4bit", double_quant=False))
    linear_w = shape.layers * sum(lin.d_out * lin.d_in for lin in shape.block_linears())
    other = shape.param_counts()["total"] - linear_w
    assert bf16.memory["base_weights"] == 2 * shape.param_counts()["total"]
    assert nf4.memory["base_weights"] == pytest.approx(linear_w * (0.5 + 4 / 64) + 2 * other)
    ckpt = make_plan(shape, cfg, TrainSetup(precision="bf16", checkpointing=True))
    assert ckpt.memory["activations_blocks"] < bf16.memory["activations_blocks"] / 5
    assert ckpt.flops["recompute"] > 0 and bf16.flops["recompute"] == 0


def test_bad_input_names_the_problem():
    with pytest.raises(PlanInputError, match="unknown model"):
        resolve_shape("llama-9b")
    with pytest.raises(PlanInputError, match="gpus"):
        TrainSetup(gpus=0)
    with pytest.raises(PlanInputError, match="precision"):
        TrainSetup(precision="int3")
    with pytest.raises(PlanInputError, match="model_type"):
        shape_from_hf_config({"model_type": "t5"})
    assert main(["plan", "llama-9b"]) == 2
    assert main(["plan", "llama-8b", "--precision", "int3"]) == 2


def test_cli_json(capsys):
    assert main(["plan", "llama-70b", "--gpus", "8", "--precision", "4bit", "--source", "hyper", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["base"]["total"] == PUBLISHED["llama-70b"]
    assert 0 < out["hyper_share"] < 0.01 and out["setup"]["gpus"] == 8
