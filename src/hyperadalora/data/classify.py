"""A user's text classification data: ``text`` (and optional ``text_pair``) and ``label`` columns.

Rows come through :func:`hyperadalora.data.user.load_user_rows` (CSV, JSONL, JSON, Parquet, a
``save_to_disk`` folder, a hub id when online). Labels may be strings or integers, any number
of them; they are kept as their text (``3`` and ``"3"`` are the same label). The label set is
the training split's, in a stable order (:func:`label_order`): by number when every label is an
integer, else by string. Class ``i`` of the model's head is ``labels[i]``; the run records the
list (``RunConfig.labels``), so evaluation and export see the same mapping.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .glue import GlueExample
from .user import UserRows

TEXT, TEXT_PAIR, LABEL = "text", "text_pair", "label"
_INTEGER = re.compile(r"-?[0-9]+")
COLUMNS_FIX = (f"a classify data set needs a {TEXT!r} column, a {LABEL!r} column and optionally a {TEXT_PAIR!r} "
               "column (rename yours, e.g. in the CSV header)")


class UnseenLabelError(ValueError):
    """An evaluation (or resumed training) row has a label the model's head does not have."""


@dataclass(frozen=True)
class LabelledText:
    """One row: the text (pair) and its label as text."""

    text: str
    text_pair: str | None
    label: str


def _label_text(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: label {value!r} must be a string or an integer, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise ValueError(f"{where}: empty label")
    return text


def _text(row: dict, name: str, where: str) -> str:
    value = row[name]
    if value is None and name == TEXT_PAIR:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: column {name!r} must be a string, got {type(value).__name__}")
    return value


def labelled_texts(loaded: UserRows) -> list[LabelledText]:
    """Validated rows of ``loaded``.

    Raises:
        MissingColumnError: No ``text`` or ``label`` column (the message lists the columns there are).
        ValueError: No rows, a text that is not a string, or an empty / non-string, non-integer label.
    """
    loaded.require((TEXT, LABEL), COLUMNS_FIX)
    pair = TEXT_PAIR in loaded.columns
    out = [LabelledText(_text(row, TEXT, loaded.at(i)), _text(row, TEXT_PAIR, loaded.at(i)) if pair else None,
                        _label_text(row[LABEL], loaded.at(i)))
           for i, row in enumerate(loaded.rows)]
    if not out:
        raise ValueError(f"{loaded.where}: no rows")
    return out


def label_order(labels: Iterable[str]) -> tuple[str, ...]:
    """The distinct labels in a stable order: numerically if all are integers, else as strings."""
    distinct = set(labels)
    if all(_INTEGER.fullmatch(s) and str(int(s)) == s for s in distinct):
        return tuple(sorted(distinct, key=int))
    return tuple(sorted(distinct))


def to_examples(rows: Sequence[LabelledText], labels: Sequence[str], split: str, fix: str) -> list[GlueExample]:
    """``rows`` with label ``labels.index(label)`` (the head's class).

    Args:
        rows: The rows.
        labels: The head's classes, in order.
        split: The rows' split, for the message.
        fix: What to do about an unseen label, for the message.

    Raises:
        UnseenLabelError: A row's label is not in ``labels`` (the message names the labels found
            and the known ones).
    """
    index = {label: i for i, label in enumerate(labels)}
    unseen = label_order(r.label for r in rows if r.label not in index)
    if unseen:
        raise UnseenLabelError(f"the {split} rows have label(s) {', '.join(map(repr, unseen))} that the training "
                               f"split does not have (its labels: {', '.join(map(repr, labels))}); {fix}")
    return [GlueExample(r.text, r.text_pair, index[r.label]) for r in rows]


__all__ = ["COLUMNS_FIX", "LABEL", "LabelledText", "TEXT", "TEXT_PAIR", "UnseenLabelError", "label_order",
           "labelled_texts", "to_examples"]
