"""Run config: presets, YAML / override parsing, round trips, validation, --help text, schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from hyperadalora import AdapterConfig
from hyperadalora.train.build import batch_order
from hyperadalora.train.config import RunConfig
from hyperadalora.train.help import describe_fields, field_docs, fields_help
from hyperadalora.train.plots import short_module_name, smooth
from hyperadalora.train.presets import configs_dir, list_presets, load_run_config
from hyperadalora.train.schedule import make_scheduler, warmup_cosine
from hyperadalora.tasks import task_spec

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def test_presets_are_found():
    assert configs_dir() == CONFIGS
    assert list_presets() == PRESETS
    assert {"sst2_minilm_adalora", "sst2_minilm_hyperadalora", "rte_minilm_adalora"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_round_trips(name):
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    extra = []
    if task_spec(raw["task"]).needs_source:  # a preset for the user's own data: it names none itself
        with pytest.raises(ValueError, match=f"task={raw['task']!r} needs data_source="):
            load_run_config(name)
        extra = ["data_source=my.jsonl"]
    cfg = load_run_config(name, extra)
    assert load_run_config(CONFIGS / f"{name}.yaml", extra) == cfg  # by name or by path
    for key, value in raw.items():  # what the preset sets is what the config holds
        if key != "adapter":
            assert getattr(cfg, key) == value, key
    assert cfg.adapter.method == raw["adapter"]["method"]
    assert cfg.adapter.source == raw["adapter"].get("source", "direct")
    if cfg.adapter.method == "adalora":
        assert cfg.adapter.allocator.total_step == cfg.steps
        assert cfg.adapter.allocator.tinit + cfg.adapter.allocator.tfinal < cfg.steps
    if cfg.adapter.source == "hyper":  # hyper presets follow HyperConfig's defaults
        assert "hyper" not in raw["adapter"]
        assert cfg.adapter.hyper == AdapterConfig().hyper
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_yaml(cfg.to_yaml()) == cfg
    assert RunConfig.from_json(cfg.to_json()) == cfg


def test_yaml_file_round_trip(tmp_path):
    cfg = load_run_config("rte_minilm_hyperadalora", ["adapter.hyper.arch=mlp", "steps=40", "seed=3"])
    path = tmp_path / "config.yaml"
    cfg.to_yaml(path)
    assert RunConfig.from_yaml(path) == cfg
    assert load_run_config(path, ["steps=40"]) == cfg  # an explicit total_step equal to steps is fine


def test_defaults_without_a_preset():
    cfg = load_run_config(None)
    assert cfg == RunConfig()
    assert cfg.adapter == AdapterConfig()


def test_overrides_are_typed_by_the_field():
    cfg = load_run_config("sst2_minilm_adalora", [
        "lr=1e-4", "steps=20", "seed=7", "progress=false", "data_dir=/some/where", "run_name=123",
        "eval_rows=null", "adapter.r=6", "adapter.lora_alpha=8", "adapter.allocator.target_r=2",
        "adapter.target_modules=[query,value]", "adapter.modules_to_save=classifier",
        "adapter.hyper.hidden=64", "adapter.hyper.context=no", "warmup_steps=3", "max_grad_norm=0"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.steps == 20 and cfg.seed == 7 and cfg.progress is False
    assert cfg.data_dir == "/some/where" and cfg.run_name == "123" and cfg.eval_rows is None
    assert cfg.adapter.r == 6 and cfg.adapter.lora_alpha == 8.0 and isinstance(cfg.adapter.lora_alpha, float)
    assert cfg.adapter.target_modules == ("query", "value")
    assert cfg.adapter.modules_to_save == ("classifier",)
    assert cfg.adapter.allocator.target_r == 2 and cfg.adapter.allocator.total_step == 20
    assert (cfg.adapter.allocator.tinit, cfg.adapter.allocator.tfinal) == (2, 4)  # 10% / 20% of steps
    assert cfg.adapter.hyper.hidden == 64 and cfg.adapter.hyper.context is False
    assert cfg.effective_warmup_steps == 3 and cfg.max_grad_norm == 0.0
    # a dict of dotted keys works the same
    assert load_run_config("sst2_minilm_adalora", {"lr": 1e-4, "adapter.r": 10}).adapter.r == 10


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nadapter:\n  lora_alpha: 16\n")  # YAML 1.1 reads 1e-4 as a string
    cfg = load_run_config(path)
    assert cfg.lr == 1e-4 and cfg.adapter.lora_alpha == 16.0


def test_switching_method_by_override():
    cfg = load_run_config("sst2_minilm_lora", ["adapter.method=adalora", "adapter.r=8"])
    assert cfg.adapter.allocator.total_step == cfg.steps  # a missing allocator section is created
    with pytest.raises(ValueError, match=r"adapter\.allocator is only used with adapter\.method=adalora.*"
                                         r"adapter\.allocator=null"):
        load_run_config("sst2_minilm_adalora", ["adapter.method=lora"])
    cfg = load_run_config("sst2_minilm_adalora", ["adapter.method=lora", "adapter.allocator=null"])
    assert cfg.adapter.method == "lora" and cfg.adapter.allocator is None


@pytest.mark.parametrize(("overrides", "pattern"), [
    (["task=imdb"], r"RunConfig\.task='imdb' is not supported; allowed values: rte, wnli, sst2, mrpc, cola, alpaca"),
    (["steps=0"], r"RunConfig\.steps=0 must be >= 1"),
    (["lr=0"], r"RunConfig\.lr=0.0 must be > 0"),
    (["lr=fast"], r"RunConfig\.lr must be a number"),
    (["batch_size=2.5"], r"RunConfig\.batch_size must be an int"),
    (["warmup_ratio=2"], r"RunConfig\.warmup_ratio=2.0 must be <= 1"),
    (["progress=maybe"], r"RunConfig\.progress must be a bool"),
    (["run_name=a/b"], r"run_name='a/b' must be a plain folder name"),
    (["task=instruct"], r"task='instruct' needs data_source="),
    (["task=classify"], r"task='classify' needs data_source="),
    (["labels=[neg,pos]"], r"labels is only used with task='classify'"),
    (["task=classify", "data_source=x.csv", "labels=[pos,pos]"], r"labels must be at least two distinct"),
    (["adapter.method=vera"], r"AdapterConfig\.method='vera' is not supported; allowed values: lora, adalora"),
    (["adapter.allocator.total_step=7"], r"total_step \(7\) must equal the run's steps \(250\)"),
    (["adapter.allocator.tinit=200"], r"tinit \(200\) \+ tfinal \(50\) must be < total_step \(250\)"),
    (["adapter.hyper.arch=rnn"], r"HyperConfig\.arch='rnn' is not supported; allowed values: attention, mlp, cnn"),
    (["stepz=3"], r"unknown config field 'stepz'; did you mean steps\?"),
    (["adapter.rank=3"], r"unknown config field 'adapter\.rank'.*fields of adapter: method, r,"),
    (["adapter.hyper.hiden=3"], r"unknown config field 'adapter\.hyper\.hiden'; did you mean adapter\.hyper\.hidden"),
    (["adapter=3"], r"adapter is a section"),
    (["steps"], r"override 'steps' is not key=value"),
    (["=3"], r"is not a \(dotted\) field name"),
    (["a..b=3"], r"is not a \(dotted\) field name"),
    (["lr.x=3"], r"override lr\.x: lr is not a section"),
])
def test_bad_values_name_the_field_and_the_fix(overrides, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        load_run_config("sst2_minilm_adalora", overrides)


def test_unknown_preset_lists_presets(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"did you mean sst2_minilm_adalora.*presets: "):
        load_run_config("sst2_minilm_adalorra")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_run_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping of RunConfig fields"):
        load_run_config(bad)
    bad.write_text("adapter:\n  rr: 3\n")
    with pytest.raises(ValueError, match=r"unknown config field 'adapter\.rr'"):
        load_run_config(bad)


def test_help_documents_every_field():
    rows = describe_fields()
    names = [r[0] for r in rows]
    for must in ("task", "model", "data_dir", "steps", "grad_accum", "max_grad_norm", "eval_every", "adapter.method",
                 "adapter.allocator.target_r", "adapter.allocator.total_step", "adapter.hyper.arch",
                 "adapter.hyper.lr"):
        assert must in names
    assert all(doc for _, _, _, doc in rows), [r[0] for r in rows if not r[3]]
    text = fields_help()
    for name in names:
        assert f"  {name} (" in text
    assert set(field_docs(RunConfig)) == {f for f in RunConfig.__dataclass_fields__}


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)  # half way through the cosine
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0)
    assert warmup_cosine(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(0, 100, 0) == pytest.approx(1.0)  # no warm-up
    values = [warmup_cosine(s, 100, 10) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1e-2}], lr=1e-2)
    sched = make_scheduler(opt, 20, 4)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert seen[4] == pytest.approx(1e-2) and seen[-1] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))


def test_batch_order_is_seeded_and_covers_each_epoch():
    a = batch_order(10, 4, seed=1)
    first = [next(a) for _ in range(4)]  # 2 batches per epoch (the incomplete tail is dropped)
    again = batch_order(10, 4, seed=1)
    assert [next(again) for _ in range(4)] == first
    assert all(len(b) == 4 for b in first)
    assert len(set(first[0]) | set(first[1])) == 8
    assert first[:2] != first[2:]  # a fresh permutation per epoch
    other = batch_order(10, 4, seed=2)
    assert [next(other) for _ in range(2)] != first[:2]
    small = batch_order(3, 8, seed=0)
    assert sorted(next(small)) == [0, 1, 2]  # fewer rows than one batch: all of them
    with pytest.raises(ValueError, match="no training rows"):
        next(batch_order(0, 4, seed=0))


def test_smooth_and_module_names():
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    s = smooth([0.0, float("nan"), 1.0])
    assert s[0] == 0.0 and s[1] == 0.0 and 0 < s[2] < 1
    assert short_module_name("bert.encoder.layer.3.attention.self.query") == "L3.attn.query"
    assert short_module_name("bert.encoder.layer.3.output.dense") == "L3.ffn.out"
    assert short_module_name("model.layers.11.self_attn.q_proj") == "L11.attn.q_proj"


def test_hyper_presets_differ_from_their_adalora_presets_only_in_the_source():
    for task, model in (("sst2", "minilm"), ("rte", "minilm"), ("alpaca", "smollm2")):
        direct = load_run_config(f"{task}_{model}_adalora")
        assert load_run_config(f"{task}_{model}_hyperadalora") == load_run_config(
            f"{task}_{model}_adalora", ["adapter.source=hyper"])
        assert direct.adapter.source == "direct"
