"""Fuzzing the data folders: every malformed split of every trainable task is a named error.

Hypothesis builds a data folder for a task with one split damaged (missing, empty, header only,
wrong column count, unknown label, bytes that are not UTF-8, invalid JSON, a row that is not an
object, a missing field). ``hyperadalora train`` on it must exit 2 with a message naming the file,
create no run directory, and, as ``--resume`` of an existing run, change nothing in that run. The
model path does not exist: data are checked before any model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyperadalora.cli import main
from hyperadalora.train import train
from test_train_loop import rte_config, tiny_bert_dir, write_rte

GLUE = {  # task: (header, a good row, its label column)
    "rte": ("index\tsentence1\tsentence2\tlabel", "0\ta cat\ta dog\tentailment", 3),
    "wnli": ("index\tsentence1\tsentence2\tlabel", "0\ta cat\ta dog\t1", 3),
    "sst2": ("sentence\tlabel", "a fine film \t1", 1),
    "mrpc": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t1\t2\ta cat\ta dog", 0),
    "cola": (None, "gj04\t1\t\tthe cat sat .", 1),
}
INSTRUCT = {"alpaca": ("alpaca", {"instruction": "say hi", "input": "", "output": "hi"}),
            "gsm8k": ("gsm8k", {"question": "1 + 1?", "answer": "2\n#### 2"})}
GLUE_DAMAGE = ["missing", "empty", "header_only", "columns", "label", "utf8"]
JSON_DAMAGE = ["missing", "empty", "json", "not_object", "field"]


def glue_text(task: str, damage: str, good_rows: int) -> bytes | None:
    header, row, label = GLUE[task]
    head = [header] if header else []
    good = [row] * good_rows
    cells = row.split("\t")
    cells[label] = "maybe"
    bad = {"missing": None, "empty": [], "header_only": head, "columns": head + good + [row + "\textra"],
           "label": head + good + ["\t".join(cells)], "utf8": head + good}[damage]
    if bad is None:
        return None
    if damage == "header_only" and not head:  # CoLA has no header: header-only = empty
        bad = []
    data = ("\n".join(bad) + ("\n" if bad else "")).encode()
    return data + b"\xff\xfe bad bytes\n" if damage == "utf8" else data


def json_text(source: str, damage: str, good_rows: int) -> bytes | None:
    row = INSTRUCT[source][1]
    good = "".join(json.dumps(row) + "\n" for _ in range(good_rows))
    return {"missing": None, "empty": b"", "json": (good + '{"instruction": "x",\n').encode(),
            "not_object": (good + "[1, 2]\n").encode(),
            "field": (good + json.dumps({"instruction": "x"}) + "\n").encode()}[damage]


CASES = st.one_of(
    st.tuples(st.sampled_from(sorted(GLUE)), st.sampled_from(["train", "dev"]), st.sampled_from(GLUE_DAMAGE),
              st.integers(0, 3)),
    st.tuples(st.sampled_from(sorted(INSTRUCT)), st.sampled_from(["train", "test"]), st.sampled_from(JSON_DAMAGE),
              st.integers(0, 3)),
)


def build(root: Path, task: str, split: str, damage: str, good_rows: int) -> Path:
    """A data folder for ``task`` with good files, then ``split`` replaced by its damaged version."""
    folder = root / task
    folder.mkdir(parents=True)
    if task in GLUE:
        splits, make, ext = ("train", "dev"), glue_text, "tsv"
        good = lambda: glue_text(task, "columns", 2).rsplit(b"\n", 2)[0] + b"\n"  # noqa: E731 - header + 2 rows
    else:
        splits, make, ext = ("train", "test"), json_text, "jsonl"
        good = lambda: json_text(task, "field", 3).rsplit(b"\n", 2)[0] + b"\n"  # noqa: E731 - 3 good rows
    for name in splits:
        data = make(task, damage, good_rows) if name == split else good()
        if data is not None:
            (folder / f"{name}.{ext}").write_bytes(data)
    return folder / f"{split}.{ext}"


def preset(task: str) -> str:
    return f"{task}_smollm2_adalora" if task in INSTRUCT else f"{task}_minilm_adalora"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """An RTE run stopped after its step-2 checkpoint (``--resume`` would continue it)."""
    root = tmp_path_factory.mktemp("fuzz")
    shared = {"bert": tiny_bert_dir(root), "data": write_rte(root / "data")}
    cfg = rte_config(shared, root / "runs", "save_every=2", "eval_every=0", "steps=3")
    from hyperadalora.models import load_model

    base, tok = load_model(str(shared["bert"]), num_labels=2)
    calls = {"n": 0}

    def crash(module, args, kwargs, output):
        calls["n"] += module.training
        if module.training and calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return output

    base.register_forward_hook(crash, with_kwargs=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, base_model=base, tokenizer=tok)
    return root / "runs" / "run"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=CASES)
def test_malformed_data_is_a_named_error_and_touches_no_run(case, stopped_run, tmp_path_factory, capsys):
    task, split, damage, good_rows = case
    root = tmp_path_factory.mktemp("case")
    bad_file = build(root / "data", task, split, damage, good_rows)
    out = root / "runs"
    code = main(["train", preset(task), "--data-dir", str(root / "data"), "--output-dir", str(out),
                 "model=/nonexistent/model", "run_name=r", "progress=false"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(bad_file) in err, err
    assert not out.exists()
    if task == "rte":  # the same data as the continuation of an existing run
        before = snapshot(stopped_run)
        code = main(["train", "--resume", str(stopped_run), f"data_dir={root / 'data'}"])
        err = capsys.readouterr().err
        assert code == 2 and str(bad_file) in err, err
        assert snapshot(stopped_run) == before
