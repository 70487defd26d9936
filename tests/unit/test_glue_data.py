"""GLUE TSV reading: each task's format, quoting off, MRPC's BOM, CoLA without header, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hyperadalora.data.glue import DATA_DIR_ENV, GlueExample, read_glue, resolve_data_dir


def write(root: Path, task: str, split: str, lines: list[str], *, bom: bool = False, final_newline: bool = True) -> Path:
    path = root / task / f"{split}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + ("\n" if final_newline else "")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def test_rte_string_labels_and_raw_quotes(tmp_path):
    write(tmp_path, "rte", "train", [
        "index\tsentence1\tsentence2\tlabel",
        "0\tNo Weapons Found.\tWeapons Found.\tnot_entailment",
        # a field that starts with a quote and holds an unbalanced one: default csv quoting breaks here
        '1\t"That film wasn\'t too successful, but \'WarGames,\' came out.\tThe film "WarGames" was shot.\tentailment',
        "2\tA.\tB.\tentailment",
    ])
    rows = read_glue("rte", "train", tmp_path)
    assert rows == [
        GlueExample("No Weapons Found.", "Weapons Found.", 1),
        GlueExample('"That film wasn\'t too successful, but \'WarGames,\' came out.', 'The film "WarGames" was shot.', 0),
        GlueExample("A.", "B.", 0),
    ]


def test_wnli_numeric_labels(tmp_path):
    write(tmp_path, "wnli", "dev", [
        "index\tsentence1\tsentence2\tlabel",
        "0\tI stuck a pin through a carrot.\tThe carrot had a hole.\t1",
        "1\tThe drain is clogged with hair.\tThe hair has to be cleaned.\t0",
    ])
    assert [(r.text_b, r.label) for r in read_glue("wnli", "dev", tmp_path)] == [
        ("The carrot had a hole.", 1), ("The hair has to be cleaned.", 0)]


def test_sst2_single_sentence_keeps_trailing_space(tmp_path):
    write(tmp_path, "sst2", "train", ["sentence\tlabel", "hide new secretions \t0", "it 's \" charming \t1"])
    assert read_glue("sst2", "train", tmp_path) == [
        GlueExample("hide new secretions ", None, 0), GlueExample('it \'s " charming ', None, 1)]


def test_mrpc_bom_header_and_column_order(tmp_path):
    write(tmp_path, "mrpc", "train", [
        "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
        '1\t702876\t702977\tAmrozi called " the witness " .\tReferring to him as " the witness " .',
        "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's .",
    ], bom=True)
    rows = read_glue("mrpc", "train", tmp_path)
    assert rows[0] == GlueExample('Amrozi called " the witness " .', 'Referring to him as " the witness " .', 1)
    assert rows[1].label == 0 and rows[1].text_a.startswith("Yucaipa")


def test_cola_has_no_header_and_no_final_newline(tmp_path):
    write(tmp_path, "cola", "dev", [
        "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.",
        "gj04\t0\t*\tThe weights made the rope stretch over the pulley.",
        "s_97\t1\t \tWho always drinks milk?",
    ], final_newline=False)
    rows = read_glue("cola", "dev", tmp_path)
    assert len(rows) == 3  # the first line is data, not a header
    assert rows[0] == GlueExample("The sailors rode the breeze clear of the rocks.", None, 1)
    assert [r.label for r in rows] == [1, 0, 1]
    assert rows[2].text_a == "Who always drinks milk?"


def test_examples_are_frozen(tmp_path):
    write(tmp_path, "sst2", "dev", ["sentence\tlabel", "good \t1"])
    row = read_glue("sst2", "dev", tmp_path)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.label = 0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("task", "lines", "bad_line", "words"),
    [
        # wrong column count on the 3rd line (header = line 1)
        ("rte", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\ta\tentailment"], 3, "columns"),
        # an unknown label string
        ("rte", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tcontradiction"], 2, "label"),
        ("sst2", ["sentence\tlabel", "fine \t1", "ok \t1", "bad \t2"], 4, "label"),
        # an extra tab inside a sentence
        ("mrpc", ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t1\t2\ta\tb\textra"], 2, "columns"),
        # CoLA has no header, so its first line is line 1
        ("cola", ["gj04\tx\t\tA sentence."], 1, "label"),
        ("cola", ["gj04\t1\t\tFine.", "gj04\t1\tToo few columns."], 2, "columns"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, task, lines, bad_line, words):
    path = write(tmp_path, task, "train", lines, bom=task == "mrpc")
    with pytest.raises(ValueError, match=words) as info:
        read_glue(task, "train", tmp_path)
    assert f"{path}:{bad_line}:" in str(info.value)


def test_malformed_row_messages(tmp_path):
    write(tmp_path, "wnli", "train", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\t1", "1\tonly two"])
    with pytest.raises(ValueError, match=r"wnli/train\.tsv:3: expected 4 tab-separated columns, got 2"):
        read_glue("wnli", "train", tmp_path)
    write(tmp_path, "rte", "dev", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tmaybe"])
    with pytest.raises(ValueError, match=r"rte/dev\.tsv:2: label 'maybe' is not one of"):
        read_glue("rte", "dev", tmp_path)


def test_unknown_task_and_split_list_allowed_values(tmp_path):
    with pytest.raises(ValueError, match="unknown GLUE task 'qnli'; allowed values: rte, wnli, sst2, mrpc, cola"):
        read_glue("qnli", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown split 'test'.*train, dev"):
        read_glue("rte", "test", tmp_path)


def test_missing_split_file(tmp_path):
    (tmp_path / "rte").mkdir()
    with pytest.raises(FileNotFoundError, match=r"dev\.tsv"):
        read_glue("rte", "dev", tmp_path)


def test_data_dir_from_argument_or_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir(tmp_path) == tmp_path
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    write(tmp_path, "sst2", "dev", ["sentence\tlabel", "good \t1"])
    assert read_glue("sst2", "dev") == [GlueExample("good ", None, 1)]  # data_dir from the environment
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_dir(other) == other  # the argument wins over the environment


def test_missing_data_dir_names_both_options(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(ValueError) as info:
        resolve_data_dir(None)
    assert f"--data-dir DIR or set {DATA_DIR_ENV}=DIR" in str(info.value)
    with pytest.raises(ValueError, match="--data-dir"):
        read_glue("rte", "train")


def test_nonexistent_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data_dir(tmp_path / "nowhere")
