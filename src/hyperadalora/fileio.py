"""Crash-safe file writing: atomic writes, folder swaps, manifests and checksums.

Every writer here goes through a temporary name that is fsynced and renamed, so a crash leaves
either the old file or the new one, never half of one. A folder can carry a ``manifest.json``
(:func:`write_manifest`: every file's size and SHA-256, written last); :func:`verify_checkpoint`
recomputes them and raises :class:`CorruptCheckpointError`, naming the file. Used by adapter
saving (:mod:`.checkpoint`), training checkpoints (:mod:`.train.resume`), exports and the
benchmark runner.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Writes through ``write(tmp)`` into a temporary file, fsyncs it, and renames it over ``path``.

    Refuses to replace anything but a regular file: renaming over ``/dev/null`` (a user's
    ``--out /dev/null``) would replace the device node for the whole machine.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} exists and is not a regular file (a device, folder or pipe); refusing to "
                         "replace it: give the path of a file")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, data: Any, *, sort_keys: bool = True, default=None) -> None:
    """Writes ``data`` as indented JSON (with a final newline) atomically to ``path``."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=sort_keys, default=default)
            fh.write("\n")

    atomic_write(path, write)


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Writes tensors (moved to the CPU, made contiguous) atomically as a safetensors file."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}))


# -- manifests: checksums of a folder's files ---------------------------------------------------

class CorruptCheckpointError(ValueError):
    """A checkpoint folder is incomplete or damaged (a file is missing, extra, truncated or altered).

    The message names the file and says what to do. Raised by :func:`verify_checkpoint`; a
    resumed run skips such a checkpoint and uses the previous good one.

    Attributes:
        path: The offending file (or the folder's ``manifest.json``).
        checkpoint: The checkpoint folder.
    """

    def __init__(self, message: str, path: str | os.PathLike, checkpoint: str | os.PathLike) -> None:
        super().__init__(message)
        self.path = Path(path)
        self.checkpoint = Path(checkpoint)


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(directory: Path) -> list[str]:
    """Relative POSIX paths of every file below ``directory`` except the manifest, sorted."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if not p.is_dir() and p.relative_to(directory).as_posix() != MANIFEST_NAME)


def write_manifest(directory: str | os.PathLike, **extra: Any) -> dict:
    """Writes ``directory/manifest.json``: the size and SHA-256 of every file in the folder.

    Call it after every other file is complete: the checksums are computed from the files as
    they are on disk, and a folder whose manifest is missing counts as incomplete.

    Args:
        directory: The folder (its files are listed recursively, by relative POSIX path).
        **extra: JSON values stored next to ``files`` (e.g. ``step=100``).

    Returns:
        The manifest written: ``{"format_version", **extra, "files": {name: {"size", "sha256"}}}``.
    """
    directory = Path(directory)
    files = {name: {"size": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
             for name in folder_files(directory)}
    manifest = {"format_version": MANIFEST_VERSION, **extra, "files": files}
    write_json(directory / MANIFEST_NAME, manifest)
    return manifest


def verify_checkpoint(directory: str | os.PathLike) -> dict:
    """Checks every file of a folder against its ``manifest.json``.

    Args:
        directory: A folder written with :func:`write_manifest` (e.g. a training checkpoint
            ``RUN_DIR/checkpoints/step-<N>``).

    Returns:
        The manifest.

    Raises:
        CorruptCheckpointError: The manifest is missing or unreadable (the folder was still being
            written), or a file is missing, not listed, of another size (truncated) or of another
            checksum; the message names the file.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    advice = (f"delete {directory} (a resumed run falls back to the previous good checkpoint "
              "by itself)")
    if not manifest_path.is_file():
        raise CorruptCheckpointError(f"incomplete checkpoint: {manifest_path} is missing (the checkpoint was still "
                                     f"being written when the run stopped); {advice}", manifest_path, directory)
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or manifest.get("format_version") != MANIFEST_VERSION:
            raise ValueError("unexpected layout")
        sizes = {name: int(entry["size"]) for name, entry in files.items()}
        sums = {name: str(entry["sha256"]) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(f"corrupt checkpoint: {manifest_path} is not a valid manifest ({exc}); {advice}",
                                     manifest_path, directory) from exc
    present = folder_files(directory)
    extra = sorted(set(present) - set(files))
    if extra:
        raise CorruptCheckpointError(f"corrupt checkpoint: {directory / extra[0]} is not listed in {manifest_path}; "
                                     f"{advice}", directory / extra[0], directory)
    for name in sorted(files):
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpointError(f"corrupt checkpoint: {path} is missing (listed in {manifest_path}); {advice}",
                                         path, directory)
        size = path.stat().st_size
        if size != sizes[name]:
            what = "truncated" if size < sizes[name] else "longer than written"
            raise CorruptCheckpointError(f"corrupt checkpoint: {path} is {what} ({size} bytes, the manifest says "
                                         f"{sizes[name]}); {advice}", path, directory)
        if file_sha256(path) != sums[name]:
            raise CorruptCheckpointError(f"corrupt checkpoint: {path} does not match its SHA-256 in {manifest_path} "
                                         f"(the file was altered or damaged on disk); {advice}", path, directory)
    return manifest


def fsync_dir(directory: Path) -> None:
    """Makes a folder's entries (renames, new files) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Swaps the complete folder ``tmp`` in as ``target`` (the old ``target`` is removed after)."""
    tmp, target = Path(tmp), Path(target)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    fsync_dir(tmp)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old)


def staging_dir(target: str | os.PathLike) -> Path:
    """A new empty temporary folder on ``target``'s file system, to be renamed into place by
    :func:`publish_dir` (or removed on failure). It lies beside ``target``, or beside its nearest
    existing ancestor, so that a failed write creates no folder (not even ``target``'s parents)."""
    anchor = Path(target).absolute().parent
    while not anchor.exists():
        anchor = anchor.parent
    return Path(tempfile.mkdtemp(dir=anchor, prefix=f".{Path(target).name}.", suffix=".tmp"))


def publish_dir(tmp: str | os.PathLike, target: str | os.PathLike, *, last: str | None = None,
                stale: tuple[str, ...] = ()) -> None:
    """Moves the complete folder ``tmp`` (flat: files only) in as ``target``.

    An absent or empty ``target`` is replaced by one rename (:func:`replace_dir`). Into a
    non-empty ``target`` each file is renamed over its namesake (``last`` moved last, so its
    presence marks a complete folder), files matching a ``stale`` glob that this write did not
    produce are removed (an earlier export's leftovers that would mislead a loader), and other
    files are kept. ``tmp`` is gone afterwards.
    """
    tmp, target = Path(tmp), Path(target)
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        if target.exists():
            target.rmdir()
        target.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(tmp, target)
        return
    names = sorted(p.name for p in tmp.iterdir())
    if last in names:
        names.remove(last)
        names.append(last)
    for pattern in stale:
        for old in target.glob(pattern):
            if old.is_file() and old.name not in names:
                old.unlink()
    for name in names:
        os.replace(tmp / name, target / name)
    tmp.rmdir()
    fsync_dir(target)
