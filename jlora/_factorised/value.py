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

DoRA: the magnitude ``m`` (``stack + out``) rides in one extra rank slot, the last row of B's
rank axis, with a zero column in A so the slot adds exactly zero to ``(x·A)·B``
(:meth:`LoraValue.with_magnitude`); every move then moves ``m`` with B for free.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jlora._dora_norm import rescale
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
        """``w + s·A·B`` as a dense array in the view's layout and ``w``'s dtype.

        A DoRA value gives ``m · (W + s·A·B) / ||W + s·A·B||`` (norm over ``in``, detached).
        """
        plain, m = self.without_magnitude() if self.dora else (self, None)
        w = dense(plain.w)
        wide = jnp.promote_types(w.dtype, plain.a.dtype)
        d = delta(plain.a, plain.b, plain.roles, plain.scale)
        summed = w.astype(wide) + d.astype(wide)
        if m is not None:
            summed = rescale(summed, m, plain.roles)
        return summed.astype(w.dtype)

    def with_magnitude(self, m: jax.Array | None) -> LoraValue:
        """This value carrying DoRA's ``m`` (``stack + out``) in rank slot ``r`` of B."""
        if m is None:
            return self
        ns = self.roles.count("stack")
        a = jnp.concatenate([self.a, jnp.zeros((*self.a.shape[:-1], 1), self.a.dtype)], axis=-1)
        b = jnp.concatenate([self.b, jnp.expand_dims(m.astype(self.b.dtype), ns)], axis=ns)
        return self.replace(a=a, b=b, dora=True)

    def without_magnitude(self) -> tuple[LoraValue, jax.Array]:
        """``(plain value, m)`` of a DoRA value: the rank slot taken back out of A and B."""
        ns = self.roles.count("stack")
        r = self.a.shape[-1] - 1
        plain = self.replace(
            a=self.a[..., :r], b=jax.lax.slice_in_dim(self.b, 0, r, axis=ns), dora=False
        )
        return plain, jax.lax.index_in_dim(self.b, r, axis=ns, keepdims=False)

    def parts(self) -> tuple[Any, Any, Any]:
        """The three arrays, for passing through a higher-order primitive."""
        return self.w, self.a, self.b
