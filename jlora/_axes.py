"""Axis roles: which axes of an adapted kernel are stacked layers, inputs and outputs.

The user's ``LoraConfig.axis_rules`` are tried first (first regex match wins), then the built-in
defaults below. A kernel that no rule covers is refused with its shape and an example rule: jlora
never guesses a layout.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from jlora._config import LoraConfig

_QKV = r"(.*/)?(query|key|value)/kernel"
_ATTN_OUT = r"(.*/)?out/kernel"
_CONV = r"(.*/)?[^/]*[Cc]onv[^/]*/kernel"


def _default_roles(path: str, ndim: int) -> tuple[str, ...] | None:
    if ndim == 2:
        return ("in", "out")
    if re.fullmatch(_QKV, path) and ndim in (3, 4):
        return ("stack",) * (ndim - 3) + ("in", "out", "out")
    if re.fullmatch(_ATTN_OUT, path) and ndim in (3, 4):
        return ("stack",) * (ndim - 3) + ("in", "in", "out")
    if re.fullmatch(_CONV, path) and ndim >= 3:
        return ("in",) * (ndim - 1) + ("out",)
    return None


def axis_roles(path: str, shape: Sequence[int], config: LoraConfig) -> tuple[str, ...]:
    """The role of each axis of the kernel at ``path``.

    Args:
      path: the kernel's ``"a/b/c"`` path.
      shape: the kernel's shape.
      config: supplies ``axis_rules``, tried before the built-in defaults (2-D kernels and
        embeddings ``(in, out)``; attention ``query|key|value`` ``(in, out, out)`` and ``out``
        ``(in, in, out)``, one leading ``stack`` axis allowed; ``*Conv*`` kernels
        ``(in, ..., in, out)``).

    Returns:
      A tuple of ``"stack" | "in" | "out"``, one per axis.

    Raises:
      ValueError: if a matching rule has the wrong number of axes, or no rule covers the kernel.

    Example:
      >>> axis_roles("layers/attn/query/kernel", (4, 64, 8, 16), LoraConfig())
      ('stack', 'in', 'out', 'out')
    """
    ndim = len(shape)
    for pattern, roles in config.axis_rules:
        if re.fullmatch(pattern, path):
            if len(roles) != ndim:
                raise ValueError(
                    f"axis rule {pattern!r} -> {roles} matches {path!r}, but that kernel has "
                    f"shape {tuple(shape)} ({ndim} axes, the rule names {len(roles)}); give one "
                    "role per axis or narrow the regex"
                )
            return tuple(roles)
    default = _default_roles(path, ndim)
    if default is None:
        example = ("stack",) + ("in",) * (ndim - 2) + ("out",) if ndim > 2 else ("in", "out")
        raise ValueError(
            f"kernel {path!r} has shape {tuple(shape)}, and no axis rule says which of its "
            f"{ndim} axes are 'stack', 'in' and 'out'. Add one to the config, e.g. "
            f"LoraConfig(axis_rules=[({re.escape(path)!r}, {example})]), or exclude it from "
            "targets"
        )
    return default
