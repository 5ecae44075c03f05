"""``summary``: a table of what is adapted, with shapes and trainable-parameter counts."""

from __future__ import annotations

import math
from typing import Any

import jax

from jlora._quantized import is_quantized
from jlora._tree import Site, find_sites


def _size(x: Any) -> int:
    return math.prod(getattr(x, "shape", ()))


def _trained(site: Site) -> int:
    """Trainable values of one adapted kernel: A, B and a DoRA magnitude."""
    return _size(site.a) + _size(site.b) + (0 if site.m is None else _size(site.m))


def summary(params: Any) -> str:
    """A table of the adapted kernels: shapes, rank, trainable parameters, and % trainable.

    Trainable parameters are A, B and any DoRA magnitude; a quantised kernel shows its kind.

    Args:
      params: an adapted tree (works on abstract ``jax.ShapeDtypeStruct`` leaves too); a
        quantised kernel counts its logical size.

    Returns:
      A multi-line string; the last line gives trainable vs total parameters.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> p = jlora.init_lora(jax.random.key(0), {"d": {"kernel": jnp.ones((1000, 10000))}},
      ...                     jlora.LoraConfig(rank=10))
      >>> print(summary(p).splitlines()[-1])
      trainable 110,000 of 10,110,000 parameters (1.088%)
    """
    sites = find_sites(params)
    rows = [("path", "kernel", "dtype", "rank", "A", "B", "params")]
    for s in sites:
        rows.append(
            (
                s.name,
                str(tuple(s.kernel.shape)),
                f"{s.kernel.kind} ({s.kernel.dtype})"
                if is_quantized(s.kernel)
                else str(s.kernel.dtype),
                str(s.a.shape[-1]),
                str(tuple(s.a.shape)),
                str(tuple(s.b.shape)),
                f"{_trained(s):,}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    trainable = sum(_trained(s) for s in sites)
    total = sum(_size(x) for x in jax.tree.leaves(params, is_leaf=is_quantized))
    share = 100.0 * trainable / total if total else 0.0
    lines.append(f"trainable {trainable:,} of {total:,} parameters ({share:.3f}%)")
    return "\n".join(lines)
