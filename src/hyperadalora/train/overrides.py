"""``key=value`` overrides: parsing, setting dotted keys, typing raw values by the config's fields."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any

import yaml

from ..config import JsonConfig


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", raw string value)`` (typed later by :func:`coerce`)."""
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(f"override {text!r} is not key=value (e.g. steps=50 or adapter.r=16)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part) for part in key.split(".")):
        raise ValueError(f"override {text!r}: {key!r} is not a (dotted) field name")
    return key, _Raw(value.strip())


class _Raw(str):
    """An override value as typed on the command line (typed by the target field)."""


def set_dotted(data: dict, key: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``key="a.b"`` (creating / replacing sub-mappings)."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        sub = node.get(part)
        if isinstance(sub, JsonConfig):
            sub = sub.to_dict()
        if sub is None:
            sub = {}
        if not isinstance(sub, dict):
            raise ValueError(f"override {key}: {'.'.join(parts[:i + 1])} is not a section (it is {sub!r})")
        node[part] = sub = dict(sub)
        node = sub
    node[parts[-1]] = value


def field_types(cls: type) -> dict[str, Any]:
    """``{field: type hint}`` of a config dataclass (annotations resolved)."""
    return typing.get_type_hints(cls)


def section_type(cls: type, name: str) -> type | None:
    """The config dataclass of field ``name`` when it is a nested section (``adapter``, ...), else None."""
    hint = field_types(cls).get(name)
    for arg in (typing.get_args(hint) or (hint,)):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def coerce(cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Types raw values by ``cls``'s field annotations; rejects unknown keys naming the known ones.

    YAML 1.1 reads ``1e-4`` as a string and command-line overrides are strings: both become
    the field's type here, and the field's own validation then checks the value.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            section = prefix.rstrip(".") or "the run"
            raise ValueError(f"unknown config field '{prefix}{key}'{hint} (fields of {section}: "
                             f"{', '.join(names)}; see `hyperadalora train --help`)")
        sub = section_type(cls, key)
        if sub is not None and isinstance(value, _Raw):
            value = _parse_scalar(value)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{prefix}{key} is a section: set its fields ({prefix}{key}.<field>=...) or null")
        if sub is not None and isinstance(value, dict):
            out[key] = coerce(sub, value, f"{prefix}{key}.")
        else:
            out[key] = _coerce_value(hints[key], value, f"{prefix}{key}")
    return out


def _parse_scalar(raw: str) -> Any:
    low = raw.lower()
    if low in ("null", "none", "~", ""):
        return None
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        return float(raw)
    except ValueError:
        pass
    if raw.startswith(("[", "{")):
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ValueError(f"cannot parse {raw!r}: {exc}") from exc
    return str(raw)


def _coerce_value(hint: Any, value: Any, name: str) -> Any:
    args = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else {hint}
    raw = value if isinstance(value, _Raw) else None
    if raw is not None:
        value = _parse_scalar(raw)
        if value is None and type(None) not in args and str in args:
            value = str(raw)  # e.g. run_name=none is a name here, not null
    if value is None:
        return None
    if float in args and not isinstance(value, bool):
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value  # the field's validation names it
        if isinstance(value, int):
            return float(value)
    if str in args and raw is not None and not isinstance(value, str) and not isinstance(value, list):
        return str(raw)  # run_name=123 is the string "123"
    if any(typing.get_origin(a) is tuple for a in args) and isinstance(value, str) and str not in args:
        return [value]
    return value


__all__ = ["coerce", "field_types", "parse_override", "section_type", "set_dotted"]
