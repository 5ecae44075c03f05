"""Griffe extension: reads jlora's docstrings the way the project writes them.

Rendering only; the library's docstrings are not changed.

- ``Example:`` (singular, as jlora writes it) is read as griffe's ``Examples:`` section, so its
  ``>>>`` lines render as code rather than as markdown text (where ``p["dense"]["kernel"]``
  would read as a reference link).
- An ``Attributes:`` item naming several attributes at once (``a, b, c: as in ...``, possibly
  over several lines) becomes one item per name with the shared description.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:$", re.MULTILINE)
_SECTION = re.compile(r"^\s*[A-Z][A-Za-z ]*:$")


def _split_shared_items(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    in_attributes = False
    item_indent = None
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if _SECTION.match(line):
            in_attributes = stripped == "Attributes:"
            item_indent = None
            out.append(line)
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        if in_attributes and stripped and item_indent is None:
            item_indent = indent
        if in_attributes and stripped and indent == item_indent and stripped.endswith(","):
            header = stripped
            j = i + 1
            while ":" not in header and j < len(lines):
                header += " " + lines[j].strip()
                j += 1
            names, _, rest = header.partition(":")
            desc = [rest.strip()]
            while j < len(lines) and len(lines[j]) - len(lines[j].lstrip()) > indent:
                desc.append(lines[j].strip())
                j += 1
            shared = " ".join(d for d in desc if d)
            pad = " " * indent
            out += [f"{pad}{name.strip()}: {shared}" for name in names.split(",") if name.strip()]
            i = j
            continue
        out.append(line)
        i += 1
    return "\n".join(lines if out == lines else out)


class JloraDocstrings(griffe.Extension):
    """Rewrites each docstring before griffe parses it (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Griffe event: called for every object loaded."""
        if obj.docstring is None:
            return
        value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
        obj.docstring.value = _split_shared_items(value)
