"""Griffe extension: reads jlora's docstrings the way the project writes them.

Rendering only; the library's docstrings are not changed.

- ``Example:`` (singular, as jlora writes it) is read as griffe's ``Examples:`` section, so its
  ``>>>`` lines render as code rather than as markdown text (where ``p["dense"]["kernel"]``
  would read as a reference link).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:$", re.MULTILINE)


class JloraDocstrings(griffe.Extension):
    """Rewrites each docstring before griffe parses it (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Griffe event: called for every object loaded."""
        if obj.docstring is None:
            return
        obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
