"""Documentation of the config fields, for ``hyperadalora train --help``."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from .config import RunConfig
from .overrides import field_types, section_type


def field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` parsed from the ``Attributes:`` section of ``cls``'s docstring."""
    doc = (cls.__doc__ or "").expandtabs()
    lines = doc.splitlines()
    out: dict[str, str] = {}
    in_section, current, indent = False, None, None
    for line in lines:
        stripped = line.strip()
        if stripped == "Attributes:":
            in_section, current = True, None
            continue
        if not in_section:
            continue
        if not stripped:
            current = None
            continue
        lead = len(line) - len(line.lstrip())
        m = re.match(r"(\w+):\s*(.*)", stripped)
        if m and (indent is None or lead == indent):
            indent = lead
            current = m.group(1)
            out[current] = m.group(2)
        elif current is not None and indent is not None and lead > indent:
            out[current] += " " + stripped
        else:
            break
    return out


def _type_name(hint: Any) -> str:
    text = str(hint).replace("typing.", "")
    return re.sub(r"<class '(\w+)'>", r"\1", text).replace("NoneType", "None")


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``[(dotted name, type, default, description)]`` for every field, nested sections expanded."""
    rows = []
    docs = field_docs(cls)
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        sub = section_type(cls, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        if sub is not None:
            rows.append((prefix + f.name, sub.__name__, "(section)", docs.get(f.name, "")))
            rows.extend(describe_fields(sub, f"{prefix}{f.name}."))
            continue
        shown = list(default) if isinstance(default, tuple) else default
        text = "null" if shown is None else repr(shown) if isinstance(shown, str) else str(shown).lower() \
            if isinstance(shown, bool) else str(shown)
        rows.append((prefix + f.name, _type_name(hints[f.name]), text, docs.get(f.name, "")))
    return rows


def fields_help(width: int = 100) -> str:
    """The text ``--help`` shows for every config field."""
    import textwrap

    lines = ["config fields (YAML keys, or key=value overrides; nested ones dotted):"]
    for name, type_, default, doc in describe_fields():
        lines.append(f"  {name} ({type_}, default {default})")
        doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc).replace("``", "")
        for chunk in textwrap.wrap(doc, width=width - 6):
            lines.append("      " + chunk)
    lines.append("  (adapter.allocator.total_step follows steps; tinit / tfinal default to 10% / 20% of steps)")
    return "\n".join(lines)


__all__ = ["describe_fields", "field_docs", "fields_help"]
