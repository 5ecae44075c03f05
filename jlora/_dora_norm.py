"""DoRA's column norm ``||W + s·A·B||``, dense or from the factors, and the rescale by ``m``.

The norm is over the kernel's ``in`` axes, one entry per ``stack + out`` index (the layout of
a magnitude leaf, see ``_layout``). Both users of it sit above this module: the DoRA leaves
(``_dora``) and merging (``_merge``) here, and the factorised engine
(``jlora._factorised.dora``), so neither reaches into the other for the arithmetic.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jlora._layout import axes_of

_HI = jax.lax.Precision.HIGHEST


def _letters(roles: Sequence[str]) -> dict[str, str]:
    letters = string.ascii_lowercase[: len(roles)]
    out = {r: "".join(letters[i] for i in axes_of(roles, r)) for r in ("stack", "in", "out")}
    out["all"] = letters
    return out


def dense_norm(w: jax.Array, roles: Sequence[str]) -> jax.Array:
    """``||w||`` over the ``in`` axes, laid out ``stack + out``.

    Example:
      >>> import jax.numpy as jnp
      >>> dense_norm(jnp.full((4, 3), 2.0, jnp.float32), ("in", "out"))
      Array([4., 4., 4.], dtype=float32)
    """
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
    """``m · summed / ||summed||`` (norm over ``in``, detached), in ``summed``'s layout.

    Example:
      >>> import jax.numpy as jnp
      >>> rescale(jnp.full((4, 3), 2.0, jnp.float32), jnp.ones(3), ("in", "out"))[:, 0]
      Array([0.5, 0.5, 0.5, 0.5], dtype=float32)
    """
    g = _letters(roles)
    c = m.astype(summed.dtype) / jax.lax.stop_gradient(dense_norm(summed, roles))
    return jnp.einsum(f"{g['all']},{g['stack']}{g['out']}->{g['all']}", summed, c, precision=_HI)
