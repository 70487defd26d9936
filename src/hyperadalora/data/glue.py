"""GLUE sequence-classification tasks read from a local data directory.

Layout (as in ``../shared/data``): ``<task>/train.tsv`` and ``<task>/dev.tsv`` for the tasks
``rte``, ``wnli``, ``sst2``, ``mrpc`` and ``cola``. The TSVs contain raw quote characters, so
they are read with quoting off; MRPC starts with a byte-order mark; CoLA has no header row.

Columns and labels, as the GLUE / Hugging Face loaders read them:

========  ==========================================================  ==============================
task      columns                                                     label
========  ==========================================================  ==============================
``rte``   ``index sentence1 sentence2 label``                         entailment=0, not_entailment=1
``wnli``  ``index sentence1 sentence2 label``                         0 / 1 (1 = entailment)
``sst2``  ``sentence label``                                          0 / 1 (1 = positive)
``mrpc``  ``Quality #1_ID #2_ID #1_String #2_String``                 ``Quality`` 0 / 1
``cola``  ``source label mark sentence`` (no header)                  0 / 1 (1 = acceptable)
========  ==========================================================  ==============================

Text fields are returned exactly as in the file (SST-2 sentences keep their trailing space).

Rows from elsewhere (the hub's ``nyu-mll/glue``, or a user's file read through ``datasets``) have
the hub's columns (:data:`COLUMNS`: ``sentence1`` / ``sentence2`` or ``sentence``, and ``label``)
and become examples with :func:`glue_example_from_row`.
"""

from __future__ import annotations

import codecs
import csv
import os
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "HYPERADALORA_DATA_DIR"
SPLITS = ("train", "dev")


@dataclass(frozen=True)
class GlueExample:
    """One labelled example: a sentence (pair) and its integer label."""

    text_a: str
    text_b: str | None
    label: int


@dataclass(frozen=True)
class _TaskFormat:
    header: bool
    columns: int  # expected number of columns per row
    text_a: int
    text_b: int | None
    label: int
    labels: dict[str, int]


_BINARY = {"0": 0, "1": 1}
TASKS: dict[str, _TaskFormat] = {
    # RTE labels follow GLUE / Hugging Face: entailment = 0, not_entailment = 1.
    "rte": _TaskFormat(True, 4, 1, 2, 3, {"entailment": 0, "not_entailment": 1}),
    "wnli": _TaskFormat(True, 4, 1, 2, 3, _BINARY),
    "sst2": _TaskFormat(True, 2, 0, None, 1, _BINARY),
    "mrpc": _TaskFormat(True, 5, 3, 4, 0, _BINARY),
    "cola": _TaskFormat(False, 4, 3, None, 1, _BINARY),
}


# The hub's (and a user file's) columns: (first text, second text or None).
COLUMNS: dict[str, tuple[str, str | None]] = {"rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
                                              "mrpc": ("sentence1", "sentence2"), "sst2": ("sentence", None),
                                              "cola": ("sentence", None)}


def glue_example_from_row(task: str, row: dict, where: str) -> GlueExample:
    """One example from a row with the hub's columns (:data:`COLUMNS` and ``label``).

    Args:
        task: The GLUE task.
        row: The row; ``label`` is the integer (``0`` / ``1``, also as a string) or the file's
            label name (RTE's ``entailment`` / ``not_entailment``).
        where: The row as messages name it.

    Raises:
        ValueError: A text that is not a string, or a label that is not one of the task's.
    """
    fmt, (a, b) = TASKS[task], COLUMNS[task]
    for name in (a, b):
        if name is not None and not isinstance(row[name], str):
            raise ValueError(f"{where}: column {name!r} must be a string, got {type(row[name]).__name__}")
    value, ids = row["label"], sorted(set(fmt.labels.values()))
    if isinstance(value, str) and value.strip() in fmt.labels:
        label = fmt.labels[value.strip()]
    elif isinstance(value, str) and value.strip() in {str(i) for i in ids}:
        label = int(value.strip())
    elif isinstance(value, int) and not isinstance(value, bool) and value in ids:
        label = value
    else:
        raise ValueError(f"{where}: label {value!r} is not one of {ids} or {sorted(fmt.labels)}")
    return GlueExample(row[a], row[b] if b is not None else None, label)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: the argument, else ``$HYPERADALORA_DATA_DIR``.

    Args:
        data_dir: A folder holding ``rte/``, ``wnli/``, ... (as ``../shared/data``), or ``None``.

    Returns:
        The data directory.

    Raises:
        ValueError: If neither the argument nor the environment variable is given.
        FileNotFoundError: If the chosen directory does not exist.
    """
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise ValueError(f"no data directory: pass --data-dir DIR or set {DATA_DIR_ENV}=DIR "
                         "(a folder with rte/, wnli/, sst2/, ... as in ../shared/data)")
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {path} does not exist (from "
                                f"{'--data-dir' if data_dir is not None else DATA_DIR_ENV})")
    return path


def read_glue(task: str, split: str, data_dir: str | os.PathLike | None = None) -> list[GlueExample]:
    """Reads one split of a GLUE task.

    Args:
        task: ``rte``, ``wnli``, ``sst2``, ``mrpc`` or ``cola``.
        split: ``train`` or ``dev``.
        data_dir: The data directory (see :func:`resolve_data_dir`).

    Returns:
        The examples in file order.

    Raises:
        ValueError: Unknown task or split, no data directory given, a file without data rows, or a malformed row (wrong
            column count, an unknown label, or bytes that are not UTF-8; the message names the
            file and the 1-based line number, the header counting as line 1).
        FileNotFoundError: The data directory or the split's file does not exist.
    """
    if task not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; allowed values: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {task}; allowed values: {', '.join(SPLITS)}")
    fmt = TASKS[task]
    path = resolve_data_dir(data_dir) / task / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the data directory has no {task} {split} split")
    out: list[GlueExample] = []
    line_no = 1  # an empty file: its first line is where a row was expected
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        for line_no, row in _numbered_rows(reader, path):
            if fmt.header and line_no == 1:
                continue
            if not row:  # a blank line
                continue
            if len(row) != fmt.columns:
                raise ValueError(f"{path}:{line_no}: expected {fmt.columns} tab-separated columns, got {len(row)}")
            label = fmt.labels.get(row[fmt.label].strip())
            if label is None:
                raise ValueError(f"{path}:{line_no}: label {row[fmt.label]!r} is not one of {sorted(fmt.labels)}")
            out.append(GlueExample(row[fmt.text_a], row[fmt.text_b] if fmt.text_b is not None else None, label))
    if not out:
        raise ValueError(f"{path}:{line_no}: no data rows (the file is empty"
                         f"{' or holds only its header' if fmt.header else ''}; read up to line {line_no})")
    return out


def _numbered_rows(reader, path: Path):
    """``(1-based line, row)`` pairs; undecodable bytes or a csv error become a ``ValueError``
    naming the file and line (one row per line, since quoting is off)."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError as exc:  # decoded in chunks: find the line from the bytes
            raise ValueError(f"{path}:{_first_bad_utf8_line(path)}: not valid UTF-8 ({exc.reason})") from exc
        except csv.Error as exc:
            raise ValueError(f"{path}:{reader.line_num + 1}: {exc}") from exc
        yield reader.line_num, row


def _first_bad_utf8_line(path: Path) -> int:
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        data.decode("utf-8")
        return 1
    except UnicodeDecodeError as exc:
        before = data[:exc.start]
    return before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
