"""A user's rows through Hugging Face ``datasets``: local files and folders, or a hub id when online.

Sources (:func:`load_user_rows`):

================================  ==============================================================
source                            read as
================================  ==============================================================
``*.jsonl`` / ``*.json``          ``load_dataset("json", data_files=...)``
``*.csv``                         ``load_dataset("csv", ...)``: every column a string, exactly as
                                  written (``""`` stays ``""``, ``"007"`` stays ``"007"``)
``*.parquet``                     ``load_dataset("parquet", ...)``
a ``save_to_disk`` folder         ``load_from_disk``: a ``Dataset`` is one set of rows, a
                                  ``DatasetDict`` gives the split
a folder of files                 ``<split>.{jsonl,json,csv,parquet}``
anything else                     a hub dataset id: ``load_dataset(id, split=...)``, online only
================================  ==============================================================

Splits: ``dev`` is also looked up as ``validation`` (and ``test``), ``test`` as ``validation``
(and ``dev``). A file, or a folder saved from one ``Dataset``, is a *single set* of rows
(:func:`is_single_set`): tasks hold its tail out for evaluation. Nothing here reaches the
network for a local source; a hub id with ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` set raises
a ``ValueError`` that names the local alternatives instead of trying.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
SPLIT_NAMES = {"train": ("train",), "dev": ("dev", "validation", "test"), "test": ("test", "validation", "dev")}
HUB_SPLITS = {"dev": "validation"}  # GLUE-style names the hub spells differently


class MissingColumnError(ValueError):
    """The data lacks a column the task needs (the message names it and the columns there are)."""


@dataclass(frozen=True)
class UserRows:
    """Rows read from a source, and where they came from (for messages).

    Attributes:
        rows: One dict per row, in source order.
        columns: The column names.
        where: The source as messages name it: a path, or ``<id> (hub, split <s>)``.
    """

    rows: list[dict[str, Any]]
    columns: tuple[str, ...]
    where: str

    def at(self, index: int) -> str:
        """How messages name row ``index`` (0-based): ``<where> row <index + 1>``."""
        return f"{self.where} row {index + 1}"

    def require(self, needed: Sequence[str], fix: str) -> None:
        """Raises :class:`MissingColumnError` for the first of ``needed`` that is not a column."""
        for name in needed:
            if name not in self.columns:
                raise MissingColumnError(f"{self.where}: no column {name!r} (its columns: "
                                         f"{', '.join(map(repr, self.columns)) or 'none'}); {fix}")


def offline() -> str | None:
    """The offline switch that is set (one of :data:`OFFLINE_VARS`), else None."""
    return next((v for v in OFFLINE_VARS if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")),
                None)


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (a failed TCP connection to its endpoint), else None.

    Offline, ``datasets`` retries for about 30 s before it fails; this answers in ``timeout``
    seconds. Behind a proxy (``HTTPS_PROXY`` / ``ALL_PROXY``) a direct connection says nothing,
    so nothing is probed.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host}:{port} is not reachable ({type(exc).__name__}: {exc})"
    return None


def check_online(source: str) -> None:
    """Raises a ``ValueError`` naming the local alternatives when ``source`` (a hub id) cannot be read:
    an offline switch is set, or the hub does not answer (:func:`hub_unreachable`)."""
    switch = offline()
    fix = (".jsonl/.json/.csv/.parquet file or folder, or save the data set once online with "
           f"`datasets.load_dataset({source!r}).save_to_disk(DIR)` and pass DIR")
    if switch is not None:
        raise ValueError(f"{source!r} is not a local file or folder, so it was taken as a Hugging Face hub dataset "
                         f"id, but {switch} is set (offline), so the hub is not tried. Fix: give a local {fix}; "
                         f"or unset {switch}")
    problem = hub_unreachable()
    if problem is not None:
        raise ValueError(f"{source!r} is not a local file or folder, so it was taken as a Hugging Face hub dataset "
                         f"id, but the hub cannot be reached: {problem}. Fix: pass --data-dir DIR (GLUE tasks: a "
                         f"folder as ../shared/data), or give a local {fix}")


def is_single_set(source: str) -> bool:
    """Whether ``source`` is one set of rows: a data file, or a ``save_to_disk`` folder of one ``Dataset``."""
    path = Path(source).expanduser()
    return path.is_file() or (path.is_dir() and (path / "state.json").is_file()
                              and not (path / "dataset_dict.json").is_file())


def names_a_file(source: str) -> bool:
    """Whether ``source`` ends like a data file (so it is never taken as a hub id)."""
    return Path(source).suffix.lower() in FILE_FORMATS


@contextlib.contextmanager
def _quiet(datasets) -> Iterator[None]:
    """No "Generating train split" bars while reading (restored afterwards)."""
    was_on = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def load_user_rows(source: str, split: str = "train") -> UserRows:
    """Reads ``split`` of ``source`` (see the module table) through ``datasets``.

    Args:
        source: A data file, a folder (``save_to_disk``, or ``<split>.<ext>`` files) or a hub id.
        split: ``train``, ``dev`` or ``test`` (aliases in the module docstring); ignored for a
            single set of rows.

    Returns:
        The rows.

    Raises:
        FileNotFoundError: A path that looks like a data file does not exist, or a folder has no
            file / saved split for ``split``.
        ValueError: An unknown file suffix, a file ``datasets`` cannot parse (the message names
            it), a hub id while offline, or a hub id that cannot be loaded.
    """
    import datasets  # slow to import: only when user data is read

    path = Path(source).expanduser()
    with _quiet(datasets):
        if path.is_file():
            return _load_file(datasets, path)
        if path.is_dir():
            return _load_folder(datasets, path, split)
        if names_a_file(source):
            raise FileNotFoundError(f"data file {path} not found")
        return _load_hub(datasets, source, split)


def _load_file(datasets, path: Path) -> UserRows:
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown data file type {path.suffix!r}; use one of "
                         f"{', '.join(FILE_FORMATS)} (or a save_to_disk folder)")
    kwargs: dict[str, Any] = {}
    if fmt == "csv":  # strings as written: no NaN for "", no int for "007" (a text, or a label name)
        with open(path, encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh), [])
        kwargs = {"na_filter": False, "encoding": "utf-8-sig",
                  "features": datasets.Features({name: datasets.Value("string") for name in header})}
    try:
        loaded = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # datasets / pyarrow / pandas parse errors: all mean "not readable as fmt"
        raise ValueError(f"{path}: not readable as {fmt} by datasets ({type(exc).__name__}: {exc})") from exc
    return _rows(loaded, str(path))


def _load_folder(datasets, path: Path, split: str) -> UserRows:
    names = SPLIT_NAMES.get(split, (split,))
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.Dataset):
            return _rows(loaded, str(path))
        found = next((n for n in names if n in loaded), None)
        if found is None:
            raise FileNotFoundError(f"{path}: the saved DatasetDict has no {' / '.join(names)} split "
                                    f"(its splits: {', '.join(loaded)})")
        return _rows(loaded[found], f"{path} (split {found})")
    for name in names:
        for suffix in FILE_FORMATS:
            if (path / f"{name}{suffix}").is_file():
                return _load_file(datasets, path / f"{name}{suffix}")
    raise FileNotFoundError(f"{path} is neither a save_to_disk folder nor holds a {' / '.join(names)} file "
                            f"({', '.join(FILE_FORMATS)})")


def _load_hub(datasets, source: str, split: str) -> UserRows:
    check_online(source)
    hub_split = HUB_SPLITS.get(split, split)
    try:
        loaded = datasets.load_dataset(source, split=hub_split)
    except Exception as exc:  # no such dataset or split, no network, ...: all the same to the caller
        raise ValueError(f"{source!r} is not a local file or folder, so it was taken as a Hugging Face hub dataset "
                         f"id, but loading its {hub_split!r} split failed ({type(exc).__name__}: {exc})") from exc
    return _rows(loaded, f"{source} (hub, split {hub_split})")


def _rows(loaded, where: str) -> UserRows:
    return UserRows(rows=[dict(r) for r in loaded], columns=tuple(loaded.column_names), where=where)


__all__ = ["FILE_FORMATS", "MissingColumnError", "OFFLINE_VARS", "UserRows", "check_online", "hub_unreachable",
           "is_single_set", "load_user_rows", "names_a_file", "offline"]
