"""A user's own data through ``datasets``: every format, every task, offline; the ``classify`` task.

Every test here runs offline (``HF_DATASETS_OFFLINE=1``) with sockets that refuse to connect, so
a read that tried the network would fail. Files are written by independent writers (``csv``,
``json``, ``pyarrow``) and read back through :mod:`hyperadalora.data.user`; the reference is the
rows as written (and, for instruction and GLUE data, the project's own file readers).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.usefixtures("no_network")  # conftest: offline, sockets refused

from hyperadalora.cli import main  # noqa: E402
from hyperadalora.data.classify import (LabelledText, UnseenLabelError, label_order, labelled_texts,  # noqa: E402
                                        to_examples)
from hyperadalora.data.glue import GlueExample, read_glue  # noqa: E402
from hyperadalora.data.instruct import InstructionExample, read_instruction_data  # noqa: E402
from hyperadalora.data.user import MissingColumnError, is_single_set, load_user_rows  # noqa: E402
from hyperadalora.eval.metrics import macro_f1  # noqa: E402
from hyperadalora.tasks import make_task  # noqa: E402
from hyperadalora.train import RunConfig, load_run, load_trained, train  # noqa: E402
from test_train_loop import tiny_bert_dir, write_rte  # noqa: E402

# Strings a CSV / JSON round trip can get wrong: separators, quotes, a leading zero, pandas' NA
# words, an empty field, a newline inside a field, non-ASCII, a raw U+2028.
CLASSIFY_ROWS = [
    {"text": "good movie, very fun", "text_pair": "", "label": "pos"},
    {"text": 'it said "bad"', "text_pair": "NA", "label": "neg"},
    {"text": "007", "text_pair": "null", "label": "10"},
    {"text": "line one\nline two", "text_pair": "caf\u00e9 \u2028 x", "label": "neg"},
    {"text": "  spaced  ", "text_pair": "b", "label": "pos"},
    {"text": "the cat sat", "text_pair": "on the mat", "label": "10"},
]
INSTRUCT_ROWS = [
    {"instruction": "Add two numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say \"hi\", then stop", "input": "", "output": "hi,\nbye"},
    {"instruction": "caf\u00e9 \u2028 x", "input": "007", "output": " padded "},
]


def write_formats(folder: Path, rows: list[dict], stem: str = "data") -> dict[str, Path]:
    """``rows`` as CSV, JSONL, a JSON array, Parquet and a save_to_disk folder (written independently)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = {fmt: folder / f"{stem}.{fmt}" for fmt in ("csv", "jsonl", "json", "parquet")}
    with open(paths["csv"], "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["jsonl"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    paths["json"].write_text(json.dumps(rows, indent=1), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    paths["saved"] = folder / f"{stem}_saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(paths["saved"]))
    return paths


# ----------------------------------------------------------------------------------------------
# Reading every format


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json", "parquet", "saved"])
def test_every_format_reads_back_the_rows_as_written(tmp_path, fmt):
    path = write_formats(tmp_path, CLASSIFY_ROWS)[fmt]
    loaded = load_user_rows(str(path))
    assert loaded.rows == CLASSIFY_ROWS
    assert loaded.columns == ("text", "text_pair", "label")
    assert is_single_set(str(path))


def test_folders_give_the_split_with_dev_aliases(tmp_path):
    train, dev = CLASSIFY_ROWS[:4], CLASSIFY_ROWS[4:]
    folder = tmp_path / "files"
    write_formats(folder, train, stem="train")
    write_formats(folder, dev, stem="validation")
    (folder / "validation.csv").unlink()  # the .jsonl is then the validation file found
    assert load_user_rows(str(folder), "train").rows == train
    assert load_user_rows(str(folder), "dev").rows == dev  # dev -> validation
    saved = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "validation": datasets.Dataset.from_list(dev)}).save_to_disk(str(saved))
    assert not is_single_set(str(saved)) and not is_single_set(str(folder))
    assert load_user_rows(str(saved), "test").rows == dev  # test -> validation
    with pytest.raises(FileNotFoundError, match=r"DatasetDict has no extra split \(its splits: train, validation\)"):
        load_user_rows(str(saved), "extra")


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file .*missing.csv not found"):
        load_user_rows(str(tmp_path / "missing.csv"))
    (tmp_path / "rows.txt").write_text("a\n")
    with pytest.raises(ValueError, match=r"rows.txt: unknown data file type '\.txt'"):
        load_user_rows(str(tmp_path / "rows.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match="bad.jsonl: not readable as json by datasets"):
        load_user_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a save_to_disk folder nor holds a train file"):
        load_user_rows(str(tmp_path / "empty"))


def test_a_hub_id_offline_names_the_fix_without_trying_the_network(tmp_path):
    with pytest.raises(ValueError) as info:
        load_user_rows("someone/some-data", "train")
    text = str(info.value)
    assert "HF_DATASETS_OFFLINE is set" in text and "save_to_disk" in text and "local" in text
    with pytest.raises(ValueError, match="HF_DATASETS_OFFLINE is set.*save_to_disk"):
        read_instruction_data("someone/some-data", "train")  # the instruct reader's own hub path too
    config = RunConfig(task="classify", data_source="someone/some-data", steps=2)
    with pytest.raises(ValueError, match="HF_DATASETS_OFFLINE is set"):
        make_task(config, "hub").train_rows()


def test_a_hub_id_online_is_loaded_with_the_hub_split_name(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    def load_dataset(path, split):  # stands in for the hub (the network is refused here)
        calls.append((path, split))
        return datasets.Dataset.from_list(CLASSIFY_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr("hyperadalora.data.user.hub_unreachable", lambda: None)  # the stand-in hub answers
    loaded = load_user_rows("someone/reviews", "dev")
    assert calls == [("someone/reviews", "validation")] and loaded.rows == CLASSIFY_ROWS
    assert loaded.at(2) == "someone/reviews (hub, split validation) row 3"


def test_an_unreachable_hub_is_refused_at_once_naming_the_data_dir(monkeypatch):
    import socket

    from hyperadalora.data.user import hub_unreachable

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    tried = []

    def unreachable(address, timeout):
        tried.append((address, timeout))
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub was tried"))
    with pytest.raises(ValueError, match=r"the hub cannot be reached: huggingface.co:443 is not reachable "
                                         r"\(ConnectionRefusedError: refused\)\. Fix: pass --data-dir DIR"):
        load_user_rows("someone/reviews", "dev")
    assert tried == [(("huggingface.co", 443), 3.0)]
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local:8080")
    assert "mirror.local:8080 is not reachable" in hub_unreachable()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # behind a proxy a direct probe says nothing
    assert hub_unreachable() is None and len(tried) == 2


# ----------------------------------------------------------------------------------------------
# The shipped readers' behaviour, and the same rows through datasets


@pytest.mark.parametrize("fmt", ["csv", "parquet", "saved"])
def test_instruction_rows_through_datasets_equal_the_jsonl_reader(tmp_path, fmt):
    paths = write_formats(tmp_path, INSTRUCT_ROWS)
    reference = read_instruction_data(str(paths["jsonl"]))  # the project's own file:line reader
    assert reference == [InstructionExample(**r) for r in INSTRUCT_ROWS]
    assert read_instruction_data(str(paths[fmt])) == reference


def test_instruction_folder_prefers_jsonl_then_reads_a_saved_dict(tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(INSTRUCT_ROWS),
                          "test": datasets.Dataset.from_list(INSTRUCT_ROWS[:1])}).save_to_disk(str(saved))
    assert read_instruction_data(str(saved), "test") == [InstructionExample(**INSTRUCT_ROWS[0])]
    bad = tmp_path / "bad.csv"
    bad.write_text("instruction,output\nq,a\n,\n")
    assert read_instruction_data(str(bad)) == [InstructionExample("q", "", "a"), InstructionExample("", "", "")]
    bad.write_text("question,reply\nq,a\n")
    with pytest.raises(ValueError, match=r"bad.csv row 1: missing field 'output' / 'answer' / 'response'"):
        read_instruction_data(str(bad))


def test_glue_task_reads_hub_columns_from_a_user_file_like_its_tsv(tmp_path):
    data = write_rte(tmp_path / "data")
    reference = {split: read_glue("rte", split, data) for split in ("train", "dev")}
    names = {0: "entailment", 1: "not_entailment"}
    files = {}
    for split, rows in reference.items():  # label names in train, integers in dev: both are read
        files[split] = write_formats(tmp_path / split, [
            {"sentence1": r.text_a, "sentence2": r.text_b, "label": names[r.label] if split == "train" else r.label}
            for r in rows])["parquet" if split == "train" else "csv"]
    config = RunConfig(task="rte", data_source=str(files["train"]), eval_data_source=str(files["dev"]), steps=2)
    task = make_task(config, "hub")
    assert task.train_rows() == reference["train"] and task.eval_rows() == reference["dev"]
    (tmp_path / "other.csv").write_text("premise,hypothesis,label\na,b,0\n")
    with pytest.raises(MissingColumnError, match=r"other.csv: no column 'sentence1' \(its columns: 'premise'"):
        make_task(config.replace(data_source=str(tmp_path / "other.csv")), "hub").train_rows()
    (tmp_path / "three.csv").write_text("sentence1,sentence2,label\na,b,2\n")
    with pytest.raises(ValueError, match=r"three.csv row 1: label '2' is not one of \[0, 1\]"):
        make_task(config.replace(eval_data_source=str(tmp_path / "three.csv")), "hub").eval_rows()


# ----------------------------------------------------------------------------------------------
# classify: labels, errors


def test_label_order_is_numeric_for_integers_else_by_string():
    assert label_order(["10", "9", "2", "9"]) == ("2", "9", "10")
    assert label_order(["-1", "0", "1"]) == ("-1", "0", "1")
    assert label_order(["pos", "neg", "10"]) == ("10", "neg", "pos")
    assert label_order(["01", "1"]) == ("01", "1")  # "01" is not an integer's text: string order


def test_integer_and_string_labels_are_the_same_label(tmp_path):
    rows = [{"text": "a", "label": 3}, {"text": "b", "label": 10}]
    (tmp_path / "ints.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "strs.csv").write_text("text,label\na,3\nb,10\n")
    ints = labelled_texts(load_user_rows(str(tmp_path / "ints.jsonl")))
    assert ints == labelled_texts(load_user_rows(str(tmp_path / "strs.csv")))
    assert ints == [LabelledText("a", None, "3"), LabelledText("b", None, "10")]
    labels = label_order(r.label for r in ints)
    assert to_examples(ints, labels, "training", "") == [GlueExample("a", None, 0), GlueExample("b", None, 1)]


def test_classify_errors_name_the_column_or_the_label(tmp_path):
    (tmp_path / "nolabel.csv").write_text("text,class\na,x\n")
    with pytest.raises(MissingColumnError) as info:
        labelled_texts(load_user_rows(str(tmp_path / "nolabel.csv")))
    assert "no column 'label'" in str(info.value) and "'text', 'class'" in str(info.value)
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1.5}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl row 1: label 1.5 must be a string or an integer"):
        labelled_texts(load_user_rows(str(tmp_path / "bad.jsonl")))
    (tmp_path / "empty.csv").write_text("text,label\na,\n")
    with pytest.raises(ValueError, match=r"empty.csv row 1: empty label"):
        labelled_texts(load_user_rows(str(tmp_path / "empty.csv")))
    rows = [LabelledText("a", None, "x"), LabelledText("b", None, "z"), LabelledText("c", None, "y")]
    with pytest.raises(UnseenLabelError, match=r"held-out rows have label\(s\) 'y', 'z'.*its labels: 'x'"):
        to_examples(rows, ("x",), "held-out", "fix it")


def test_classify_holds_out_the_tail_of_one_file_and_records_its_labels(tmp_path):
    rows = [{"text": f"t{i}", "label": ("b", "a", "c")[i % 3]} for i in range(20)]
    path = write_formats(tmp_path, rows)["csv"]
    task = make_task(RunConfig(task="classify", data_source=str(path), steps=2), "hub")
    train_rows, eval_rows = task.train_rows(), task.eval_rows()
    assert [r.text_a for r in train_rows] == [f"t{i}" for i in range(18)]  # 10% held out
    assert [r.text_a for r in eval_rows] == ["t18", "t19"]
    assert task.class_labels() == ("a", "b", "c")
    assert [r.label for r in eval_rows] == [["a", "b", "c"].index(rows[i]["label"]) for i in (18, 19)]
    settled = task.settle(task.config)
    assert settled.labels == ("a", "b", "c") and RunConfig.from_yaml(settled.to_yaml()).labels == ("a", "b", "c")


def test_macro_f1_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for _ in range(20):
        golds = [rng.randrange(4) for _ in range(30)]
        preds = [rng.randrange(5) for _ in range(30)]
        assert macro_f1(preds, golds) == pytest.approx(sklearn.f1_score(golds, preds, average="macro"))


# ----------------------------------------------------------------------------------------------
# classify end to end on a tiny model


def write_classify(folder: Path) -> tuple[Path, Path]:
    """Three string labels in train (CSV); the held-out JSONL uses two of them."""
    words = {"pos": "good great fun", "neg": "bad awful boring", "meh": "the a movie"}
    train = [{"text": f"{words[lab]} {i}", "label": lab} for i in range(24) for lab in ("pos", "neg", "meh")][:36]
    dev = [{"text": f"{words[lab]} film", "label": lab} for lab in ("pos", "neg", "pos", "neg", "meh")]
    paths = write_formats(folder, train, stem="train")
    dev_path = folder / "dev.jsonl"
    dev_path.write_text("".join(json.dumps(r) + "\n" for r in dev))
    return paths["csv"], dev_path


def classify_args(model: Path, train_file: Path, dev_file: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--output-dir", str(out), "--no-progress", "task=classify", f"model={model}",
            f"data_source={train_file}", f"eval_data_source={dev_file}", "run_name=run", "steps=6", "batch_size=6",
            "lr=5e-3", "adapter.method=lora", "adapter.r=4", "adapter.target_modules=[query,value]", *extra]


def test_classify_trains_evaluates_and_reloads_with_its_labels(tmp_path, capsys):
    model = tiny_bert_dir(tmp_path)  # saved with a 2-class head: classify replaces it by a 3-class one
    train_file, dev_file = write_classify(tmp_path / "data")
    assert main(classify_args(model, train_file, dev_file, tmp_path / "runs")) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = Path(summary["run_dir"])
    config = load_run(run)
    assert config.labels == ("meh", "neg", "pos")
    metrics = summary["metrics"]
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    golds = [json.loads(line)["label"] for line in dev_file.read_text().splitlines()]
    assert [p["label"] for p in predictions] == golds  # labels named as in the file
    assert metrics["accuracy"] == pytest.approx(sum(p["prediction"] == g for p, g in zip(predictions, golds)) / 5)
    assert metrics["macro_f1"] == pytest.approx(macro_f1([p["prediction"] for p in predictions], golds))
    # The saved adapter on a freshly loaded base: class i is labels[i], as the run's predictions say.
    model_, tokenizer = load_trained(config, run / "adapter")
    assert model_.model.classifier.out_features == 3
    model_.eval()
    with torch.no_grad():
        texts = [json.loads(line)["text"] for line in dev_file.read_text().splitlines()]
        logits = model_(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    assert [config.labels[i] for i in logits.argmax(-1).tolist()] == [p["prediction"] for p in predictions]
    assert main(["eval", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["accuracy"] == metrics["accuracy"]


def test_an_unseen_eval_label_fails_before_training(tmp_path, capsys):
    model = tiny_bert_dir(tmp_path)
    train_file, dev_file = write_classify(tmp_path / "data")
    dev_file.write_text(dev_file.read_text() + json.dumps({"text": "a", "label": "angry"}) + "\n")
    out = tmp_path / "runs"
    assert main(classify_args(model, train_file, dev_file, out)) == 2
    err = capsys.readouterr().err
    assert "label(s) 'angry' that the training split does not have" in err and "'meh', 'neg', 'pos'" in err
    assert not out.exists() or not any(out.iterdir())  # no run directory: nothing was trained
    with pytest.raises(MissingColumnError, match="no column 'text'"):
        (tmp_path / "x.csv").write_text("sentence,label\na,b\n")
        train(RunConfig(task="classify", model=str(model), data_source=str(tmp_path / "x.csv"),
                        output_dir=str(out), steps=2, progress=False))
    assert not out.exists() or not any(out.iterdir())
