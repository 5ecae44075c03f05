"""DoRA inside the factorised path: the factor ``m / ||W + s·A·B||`` and where it applies.

``W' = m · (W + s·A·B) / ||W + s·A·B||`` (see ``jlora._dora``), the norm over the kernel's
``in`` axes, one per ``stack + out`` entry, detached in the backward pass. The factorised
path scales the output of ``x·W + s·(x·A)·B`` by ``m / norm``, computing the norm from
``||W||²``, ``AᵀW`` and ``AᵀA`` (O(in·out·r), ``jlora._dora_norm``, which the merge path
shares). While the kernel moves, ``m`` rides in an extra rank slot of B
(:meth:`LoraValue.with_magnitude`), so every move moves it too; the consuming rule takes it out
again (:func:`split_magnitude`) and applies the factor to the output (:func:`output_scale`) or
the input (:func:`input_scale`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jlora._dora_norm import factorised_norm
from jlora._factorised.quantized_view import dense
from jlora._factorised.value import LoraValue
from jlora._layout import axes_of


def split_magnitude(value: LoraValue) -> tuple[LoraValue, jax.Array | None]:
    """``(plain LoraValue, m / ||W + s·A·B||)`` for a DoRA value; ``(value, None)`` otherwise.

    The factor is laid out ``stack + out`` in the value's current view, in the view's dtype
    promoted with the factors'; the norm is detached.
    """
    if not value.dora:
        return value, None
    plain, m = value.without_magnitude()
    w = dense(plain.w)  # the norm needs the whole base (a QLoRA base is dequantised for it)
    dtype = jnp.promote_types(w.dtype, plain.a.dtype)
    norm = factorised_norm(
        w.astype(dtype),
        plain.a.astype(dtype),
        plain.b.astype(dtype),
        plain.roles,
        plain.scale,
    )
    return plain, m.astype(dtype) / jax.lax.stop_gradient(norm)


def output_scale(mag: jax.Array, kb: Sequence[int], nx: int, on_left: bool) -> jax.Array:
    """``mag`` (``stack + out``) shaped to broadcast over a ``dot_general`` rule's output.

    The output is ``batch + x_free + out`` (kernel on the right) or ``batch + out + x_free``
    (kernel on the left), its batch axes in ``kb`` order.
    """
    ns = len(kb)
    order = [sorted(kb).index(k) for k in kb]
    mag = jnp.transpose(mag, [*order, *range(ns, mag.ndim)])
    stack, out = mag.shape[:ns], mag.shape[ns:]
    return (
        mag.reshape(*stack, *out, *(1,) * nx) if on_left else mag.reshape(*stack, *(1,) * nx, *out)
    )


def input_scale(
    mag: jax.Array,
    roles: Sequence[str],
    kb: Sequence[int],
    kc: Sequence[int],
    xb: Sequence[int],
    xc: Sequence[int],
    x_shape: Sequence[int],
) -> jax.Array:
    """``mag`` (``stack + out``) shaped to broadcast over ``x`` in ``x·Wᵀ``.

    When a ``dot_general`` contracts the kernel's ``out`` axes ``kc`` with ``x``'s ``xc`` (and
    batches its stack axes ``kb`` with ``xb``), ``x·(c·W)ᵀ = (c·x)·Wᵀ``: the per-out-unit
    factor scales ``x`` along the axes it meets.
    """
    stack, out = axes_of(roles, "stack"), axes_of(roles, "out")
    source = {xa: stack.index(ka) for xa, ka in zip(xb, kb, strict=True)}
    source |= {xa: len(stack) + out.index(ka) for xa, ka in zip(xc, kc, strict=True)}
    mag = jnp.transpose(mag, [source[d] for d in sorted(source)])
    return mag.reshape([n if d in source else 1 for d, n in enumerate(x_shape)])
