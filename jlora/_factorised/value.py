"""A symbolic adapted kernel ``W + s·A·B`` carried through the ops that only move it.

While :func:`jlora.lora` interprets a traced function, an adapted kernel is never materialised.
It is a :class:`LoraValue`: the concrete ``w`` (the base kernel, already moved by every op
seen so far, so the base computation is exactly the original one), the factors ``a`` and ``b``,
the scale, and one role per axis of the current view of the kernel.

Invariant (the same as ``_layout``'s, applied to the current view): ``a`` is
``stack + in + (r,)`` and ``b`` is ``stack + (r,) + out``, each group's axes in the order they
have in the view. The moving ops (``moves``) keep the invariant by permuting or reshaping
inside a group of ``a`` and ``b``; the factors keep their own dtype until a consuming rule
(``consume``) casts them to the compute dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jlora._factorised.dora import dense_kernel
from jlora._factorised.quantized_view import dense
from jlora._layout import axes_of, delta


@dataclasses.dataclass(frozen=True)
class LoraValue:
    """An adapted kernel in factorised form: ``w + scale * (a contracted with b)``."""

    w: Any  # a dense array, or a QLoRA base still quantised (a ``QuantizedView``)
    a: Any
    b: Any
    roles: tuple[str, ...]
    scale: float
    name: str
    dora: bool = False  # DoRA: the magnitude rides in the last rank slot of B (see _dora)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the current view of the kernel."""
        return tuple(self.w.shape)

    def group(self, role: str) -> tuple[int, ...]:
        """View axes that have ``role``, in view order."""
        return axes_of(self.roles, role)

    def replace(self, **changes: Any) -> LoraValue:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def materialise(self) -> jax.Array:
        """``w + s·A·B`` as a dense array in the view's layout and ``w``'s dtype."""
        if self.dora:
            return dense_kernel(self)
        w = dense(self.w)
        wide = jnp.promote_types(w.dtype, self.a.dtype)
        d = delta(self.a, self.b, self.roles, self.scale)
        return (w.astype(wide) + d.astype(wide)).astype(w.dtype)

    def parts(self) -> tuple[Any, Any, Any]:
        """The three arrays, for passing through a higher-order primitive."""
        return self.w, self.a, self.b
