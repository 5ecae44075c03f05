"""DoRA: a trained magnitude per output unit over the normalised adapted kernel.

``W' = m · (W + s·A·B) / ||W + s·A·B||`` (Liu et al., 2024), the norm over the kernel's ``in``
axes, one per ``stack + out`` entry, and treated as a constant in the backward pass (the paper's
"detach", as PEFT does) so ``m`` and the factors get gradients only through ``m / norm`` times
the output. The magnitude leaf ``k_lora_m`` (shape ``stack + out``, see ``_layout``) starts at
the norm itself, so the model is unchanged at step 0. Merging folds ``m / norm`` into the
kernel; the factorised path scales the output of ``x·W + s·(x·A)·B`` by it, computing the norm
from ``||W||²``, ``AᵀW`` and ``AᵀA`` (O(in·out·r)) without forming ``W + s·A·B``.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import DictKey

from jlora._config import LoraConfig
from jlora._init import init_lora
from jlora._layout import axes_of, delta, magnitude_key
from jlora._paths import KeyPath, path_str
from jlora._quantized import as_array
from jlora._quantized_view import dense
from jlora._resolve import resolve_sites
from jlora._tree import rebuild

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


def add_magnitudes(params: Any, config: LoraConfig) -> Any:
    """Adds a DoRA magnitude ``k_lora_m = ||W + s·A·B||`` beside every adapted kernel.

    Starting ``m`` at the current norm leaves the model unchanged, whatever A and B are (plain,
    PiSSA or trained adapters).

    An embedding table ``(vocab, features)`` gets one magnitude per feature, its norm over
    the vocabulary, as PEFT's DoRA embeddings do.

    Raises:
      ValueError: for a kernel that already has a magnitude.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> cfg = jlora.LoraConfig(rank=2)
      >>> p = jlora.init_lora(jax.random.key(0), {"d": {"kernel": jnp.ones((4, 3))}}, cfg)
      >>> add_magnitudes(p, cfg)["d"]["kernel_lora_m"]
      Array([2., 2., 2.], dtype=float32)
    """
    planned: dict[KeyPath, jax.Array] = {}
    for adapted in resolve_sites(params, config):
        site, name = adapted.site, adapted.site.name
        if site.m is not None:
            raise ValueError(f"DoRA: {name!r} already has a magnitude {magnitude_key(site.key)!r}")
        dtype = jnp.promote_types(site.kernel.dtype, site.a.dtype)
        norm = factorised_norm(
            as_array(site.kernel).astype(dtype), site.a, site.b, adapted.roles, adapted.scale
        )
        planned[site.path] = norm.astype(config.dtype)

    def add(parent: KeyPath, items: dict[Any, Any]) -> dict[Any, Any]:
        for k in list(items):
            m = planned.get((*parent, DictKey(k)))
            if m is not None:
                items[magnitude_key(k)] = m
        return items

    return rebuild(params, add)


def place_magnitudes(params: Any, magnitudes: Mapping[str, Any]) -> Any:
    """``params`` with ``k_lora_m = magnitudes[path]`` beside each kernel named by its path.

    Used when loading saved DoRA adapters; the kernels must already have their A and B.

    Raises:
      ValueError: if a named kernel is not in a dict of ``params``.
    """
    placed = set()

    def add(parent: KeyPath, items: dict[Any, Any]) -> dict[Any, Any]:
        for k in list(items):
            name = path_str((*parent, DictKey(k)))
            if name in magnitudes and isinstance(k, str):
                items[magnitude_key(k)] = jnp.asarray(magnitudes[name])
                placed.add(name)
        return items

    out = rebuild(params, add)
    missing = sorted(set(magnitudes) - placed)
    if missing:
        raise ValueError(f"DoRA magnitudes for {missing} have no kernel in a dict of params")
    return out


def place_peft_magnitudes(
    params: Any, config: LoraConfig, given: Mapping[str, Mapping[tuple[int, ...], Any]]
) -> Any:
    """PEFT magnitudes (``given[kernel][stack index] = vector``) placed as ``k_lora_m``.

    A stack layer without a vector (PEFT left it out) gets ``||W + s·A·B||``: no change there.
    """
    full: dict[str, Any] = {}
    for adapted in resolve_sites(params, config):
        site = adapted.site
        if site.name not in given:
            continue
        dtype = jnp.promote_types(site.kernel.dtype, site.a.dtype)
        w = as_array(site.kernel).astype(dtype)
        m = factorised_norm(w, site.a, site.b, adapted.roles, adapted.scale)
        out = tuple(site.kernel.shape[i] for i in axes_of(adapted.roles, "out"))
        for index, vector in given[site.name].items():
            m = m.at[index].set(jnp.asarray(vector, m.dtype).reshape(out))
        full[site.name] = m.astype(config.dtype)
    return place_magnitudes(params, full)


def init_dora(key: jax.Array, params: Any, config: LoraConfig) -> Any:
    """:func:`jlora.init_lora` plus a DoRA magnitude per output unit (the kernel's norm).

    The adapted kernel is ``m · (W + s·A·B) / ||W + s·A·B||``; with ``B = 0`` and ``m = ||W||``
    the model is exactly unchanged at step 0. ``merge_params`` folds ``m`` in; ``jlora.lora``
    computes it factorised; ``lora_optimizer`` trains ``m`` with A and B.

    Args:
      key: a PRNG key (for A, as ``init_lora``).
      params: the base tree.
      config: what to adapt (any kernel ``init_lora`` takes, embedding tables included).

    Returns:
      The adapted tree with ``k_lora_a``, ``k_lora_b`` and ``k_lora_m`` beside each kernel.

    Raises:
      ValueError: as ``init_lora``.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> cfg = jlora.LoraConfig(rank=2)
      >>> p = init_dora(jax.random.key(0), {"d": {"kernel": jnp.ones((4, 3))}}, cfg)
      >>> sorted(p["d"]), p["d"]["kernel_lora_m"].shape
      (['kernel', 'kernel_lora_a', 'kernel_lora_b', 'kernel_lora_m'], (3,))
    """
    return add_magnitudes(init_lora(key, params, config), config)


# ---- the factorised path: the magnitude rides in an extra rank slot of the factors -------------


def with_magnitude(value: Any, m: Any) -> Any:
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


def split_magnitude(value: Any) -> tuple[Any, Any]:
    """``(plain LoraValue, m / ||W + s·A·B||)`` for a DoRA value; ``(value, None)`` otherwise.

    The factor is laid out ``stack + out`` in the value's current view, in the view's dtype
    promoted with the factors'; the norm is detached.
    """
    if not getattr(value, "dora", False):
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


def _unpack(value: Any) -> tuple[Any, jax.Array]:
    ns = value.roles.count("stack")
    r = value.a.shape[-1] - 1
    plain = value.replace(
        a=value.a[..., :r], b=jax.lax.slice_in_dim(value.b, 0, r, axis=ns), dora=False
    )
    return plain, jax.lax.index_in_dim(value.b, r, axis=ns, keepdims=False)


def dense_kernel(value: Any) -> jax.Array:
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
