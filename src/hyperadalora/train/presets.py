"""Finding and loading run configs: shipped presets (``configs/*.yaml``), YAML files, overrides."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig
from .overrides import coerce, parse_override, set_dotted

CONFIGS_ENV = "HYPERADALORA_CONFIGS"


def configs_dir() -> Path:
    """The folder of shipped presets: ``$HYPERADALORA_CONFIGS``, else the checkout's ``configs/``."""
    import os

    env = os.environ.get(CONFIGS_ENV)
    if env:
        return Path(env).expanduser()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "configs").is_dir() and (parent / "pyproject.toml").is_file():
            return parent / "configs"
    return Path.cwd() / "configs"


def list_presets() -> list[str]:
    """Names of the shipped presets (``configs/*.yaml`` without the suffix)."""
    folder = configs_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def find_config_file(name_or_path: str | Path) -> Path:
    """A YAML file path, or a preset name looked up in :func:`configs_dir`."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    folder = configs_dir()
    for candidate in (folder / f"{name_or_path}", folder / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    presets = list_presets()
    close = difflib.get_close_matches(str(name_or_path), presets, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise FileNotFoundError(f"config {str(name_or_path)!r} is neither a YAML file nor a preset in {folder}{hint}; "
                            f"presets: {', '.join(presets) or 'none found'}")


def read_config_dict(source: str | Path | dict | None) -> dict[str, Any]:
    """The raw mapping of a YAML file / preset name / YAML text / dict (``None``: empty)."""
    if source is None:
        return {}
    if isinstance(source, dict):
        return dict(source)
    text = str(source)
    if "\n" in text or text.lstrip().startswith("{"):
        where, raw = "YAML text", text
    else:
        path = find_config_file(text)
        where, raw = str(path), path.read_text()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where} is not valid YAML: {exc}") from exc
    if data is None:
        if where != "YAML text":  # an empty file is a mistake, not "every default"
            raise ValueError(f"{where} is empty: a config file holds a mapping of RunConfig fields")
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a mapping of RunConfig fields, got {type(data).__name__}")
    return data


def load_run_config(source: str | Path | dict | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """Loads a :class:`RunConfig` from a preset / YAML file / dict, then applies overrides.

    Args:
        source: A preset name (``configs/<name>.yaml``), a YAML path or text, a dict, or ``None``
            (every field at its default).
        overrides: ``["key=value", "adapter.r=16", ...]`` (values parsed by the field's type:
            numbers, ``true``/``false``, ``null``, ``[a, b]`` lists) or a ``{dotted key: value}`` dict.

    Raises:
        ValueError: Unknown field (the message lists the known ones), a malformed override, or a
            value that the field's validation rejects.
    """
    data = read_config_dict(source)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in (overrides or [])]
    for key, value in items:
        set_dotted(data, key, value)
    return RunConfig.from_dict(coerce(RunConfig, data, ""))


__all__ = ["CONFIGS_ENV", "configs_dir", "find_config_file", "list_presets", "load_run_config", "read_config_dict"]
