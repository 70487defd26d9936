"""GLUE TSV reading: formats, quoting, BOM, header-less CoLA, and row-numbered errors."""

from __future__ import annotations

import pytest

from hyperadalora.data.glue import GlueExample, read_glue, resolve_data_dir


def write(tmp_path, task, split, text, encoding="utf-8"):
    d = tmp_path / task
    d.mkdir(exist_ok=True)
    (d / f"{split}.tsv").write_text(text, encoding=encoding)
    return tmp_path


def test_rte_labels_and_raw_quotes(tmp_path):
    data = write(tmp_path, "rte", "train",
                 'index\tsentence1\tsentence2\tlabel\n'
                 '0\tHe said "hi\tNo quote closes\tentailment\n'
                 '1\tA\tB\tnot_entailment\n')
    rows = read_glue("rte", "train", data)
    assert rows == [GlueExample('He said "hi', "No quote closes", 0), GlueExample("A", "B", 1)]


def test_mrpc_byte_order_mark_and_columns(tmp_path):
    data = write(tmp_path, "mrpc", "dev", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                                          '1\t7\t8\tAn " odd one\tAnother\n', encoding="utf-8")
    assert read_glue("mrpc", "dev", data) == [GlueExample('An " odd one', "Another", 1)]


def test_cola_has_no_header_and_sst2_single_sentence(tmp_path):
    data = write(tmp_path, "cola", "dev", "gj04\t1\t\tThe sailors rode.\ngj04\t0\t*\tRode sailors the.")
    assert read_glue("cola", "dev", data) == [GlueExample("The sailors rode.", None, 1),
                                              GlueExample("Rode sailors the.", None, 0)]
    write(tmp_path, "sst2", "train", "sentence\tlabel\nit 's good . \t1\n")
    assert read_glue("sst2", "train", tmp_path) == [GlueExample("it 's good . ", None, 1)]


def test_malformed_rows_name_file_and_line(tmp_path):
    write(tmp_path, "wnli", "train", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\t1\n1\tonly two\n")
    with pytest.raises(ValueError, match=r"wnli/train\.tsv:3: expected 4 tab-separated columns, got 2"):
        read_glue("wnli", "train", tmp_path)
    write(tmp_path, "rte", "dev", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"rte/dev\.tsv:2: label 'maybe' is not one of"):
        read_glue("rte", "dev", tmp_path)


def test_unknown_task_split_and_missing_data_dir(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown GLUE task 'qqp'; allowed values: rte, wnli, sst2, mrpc, cola"):
        read_glue("qqp", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        read_glue("rte", "test", tmp_path)
    monkeypatch.delenv("HYPERADALORA_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match="--data-dir DIR or set HYPERADALORA_DATA_DIR"):
        resolve_data_dir(None)
    monkeypatch.setenv("HYPERADALORA_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="does not exist"):
        resolve_data_dir(None)
