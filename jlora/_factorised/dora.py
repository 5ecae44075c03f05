"""DoRA inside the factorised path: the norm ``||W + s·A·B||`` without forming it, and ``m``.

``W' = m · (W + s·A·B) / ||W + s·A·B||`` (see ``jlora._dora``), the norm over the kernel's
``in`` axes, one per ``stack + out`` entry, detached in the backward pass. The factorised
path scales the output of ``x·W + s·(x·A)·B`` by ``m / norm``, computing the norm from
``||W||²``, ``AᵀW`` and ``AᵀA`` (O(in·out·r)). While the kernel moves, ``m`` rides in an extra
rank slot of B (:func:`with_magnitude`), so every move moves it too; the consuming rule takes
it out again (:func:`split_magnitude`). The merge path uses the same norms (:func:`rescale`).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jlora._factorised.quantized_view import dense
from jlora._layout import axes_of, delta

if TYPE_CHECKING:  # value.py imports this module
    from jlora._factorised.value import LoraValue

_HI = jax.lax.Precision.HIGHEST


def _letters(roles: Sequence[str]) -> dict[str, str]:
    letters = string.ascii_lowercase[: len(roles)]
    out = {r: "".join(letters[i] for i in axes_of(roles, r)) for r in ("stack", "in", "out")}
    out["all"] = letters
    return out


def dense_norm(w: jax.Array, roles: Sequence[str]) -> jax.Array:
    """``||w||`` over the ``in`` axes, laid out ``stack + out``."""
    g = _letters(roles)
    return jnp.sqrt(
        jnp.einsum(f"{g['all']},{g['all']}->{g['stack']}{g['out']}", w, w, precision=_HI)
    )


def factorised_norm(
    w: jax.Array, a: jax.Array, b: jax.Array, roles: Sequence[str], scale: float
) -> jax.Array:
    """``||W + s·A·B||`` over the ``in`` axes without forming it: O(in·out·r).

    ``||W_o + s·(AB)_o||² = ||W_o||² + 2s·Σ_r B_ro·(AᵀW)_ro + s²·Σ_rq B_ro·(AᵀA)_rq·B_qo``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w, a, b = jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3))
      >>> bool(jnp.allclose(factorised_norm(w, a, b, ("in", "out"), 0.5),
      ...                   dense_norm(w + 0.5 * a @ b, ("in", "out"))))
      True
    """
    g = _letters(roles)
    st, i, o = g["stack"], g["in"], g["out"]
    a_spec, b_spec = f"{st}{i}Z", f"{st}Z{o}"
    ww = jnp.einsum(f"{g['all']},{g['all']}->{st}{o}", w, w, precision=_HI)
    atw = jnp.einsum(f"{a_spec},{g['all']}->{st}Z{o}", a, w, precision=_HI)
    cross = jnp.einsum(f"{st}Z{o},{b_spec}->{st}{o}", atw, b, precision=_HI)
    ata = jnp.einsum(f"{a_spec},{st}{i}Y->{st}ZY", a, a, precision=_HI)
    bab = jnp.einsum(f"{st}ZY,{st}Y{o},{b_spec}->{st}{o}", ata, b, b, precision=_HI)
    s = jnp.asarray(scale, ww.dtype)
    return jnp.sqrt(jnp.maximum(ww + 2 * s * cross + s * s * bab, 0))


def rescale(summed: jax.Array, m: jax.Array, roles: Sequence[str]) -> jax.Array:
    """``m · summed / ||summed||`` (norm over ``in``, detached), in ``summed``'s layout."""
    g = _letters(roles)
    c = m.astype(summed.dtype) / jax.lax.stop_gradient(dense_norm(summed, roles))
    return jnp.einsum(f"{g['all']},{g['stack']}{g['out']}->{g['all']}", summed, c, precision=_HI)


def with_magnitude(value: LoraValue, m: jax.Array | None) -> LoraValue:
    """A ``LoraValue`` carrying DoRA's ``m`` as rank slot ``r`` of B (with a zero column in A).

    The slot adds exactly zero to ``(x·A)·B``, and every op that moves the kernel (transpose,
    reshape, stack slices, scan) moves ``m`` with B for free; the consuming rule takes it out
    again with :func:`split_magnitude`.
    """
    if m is None:
        return value
    ns = value.roles.count("stack")
    a = jnp.concatenate([value.a, jnp.zeros((*value.a.shape[:-1], 1), value.a.dtype)], axis=-1)
    b = jnp.concatenate([value.b, jnp.expand_dims(m.astype(value.b.dtype), ns)], axis=ns)
    return value.replace(a=a, b=b, dora=True)


def split_magnitude(value: LoraValue) -> tuple[LoraValue, jax.Array | None]:
    """``(plain LoraValue, m / ||W + s·A·B||)`` for a DoRA value; ``(value, None)`` otherwise.

    The factor is laid out ``stack + out`` in the value's current view, in the view's dtype
    promoted with the factors'; the norm is detached.
    """
    if not value.dora:
        return value, None
    plain, m = _unpack(value)
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


def _unpack(value: LoraValue) -> tuple[LoraValue, jax.Array]:
    ns = value.roles.count("stack")
    r = value.a.shape[-1] - 1
    plain = value.replace(
        a=value.a[..., :r], b=jax.lax.slice_in_dim(value.b, 0, r, axis=ns), dora=False
    )
    return plain, jax.lax.index_in_dim(value.b, r, axis=ns, keepdims=False)


def dense_kernel(value: LoraValue) -> jax.Array:
    """A DoRA ``LoraValue`` merged: ``m · (W + s·A·B) / ||W + s·A·B||`` in ``w``'s dtype."""
    plain, m = _unpack(value)
    w = dense(plain.w)
    wide = jnp.promote_types(w.dtype, plain.a.dtype)
    summed = w.astype(wide) + delta(plain.a, plain.b, plain.roles, plain.scale).astype(wide)
    return rescale(summed, m, plain.roles).astype(w.dtype)


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
