"""PiSSA and OLoRA: adapters initialised from the kernel's own principal part, base = residual.

PiSSA (Meng et al., 2024) takes the top-``r`` singular triplets of ``W``: ``s·A·B = U_r S_r V_rᵀ``
(``A = U_r·sqrt(S_r/s)``, ``B = sqrt(S_r/s)·V_rᵀ``). OLoRA (Büyükakyüz, 2024) takes the QR of
``Wᵀ = Q R`` as PEFT does: ``A = R_rᵀ``, ``B = Q_rᵀ``. Either way the base kernel becomes the
residual ``W - s·A·B``, so the model is unchanged at step 0 up to rounding. N-d and stacked
kernels are factorised as ``stack`` batches of the ``(prod(in), prod(out))`` matrix, the same
grouping as ``_layout``. :func:`pissa_to_lora` turns a trained PiSSA/OLoRA tree into a plain
rank-``2r`` adapter against the original base (PEFT's conversion), for export.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jlora._adapters import Adapter, place
from jlora._attach import place_factored
from jlora._config import LoraConfig
from jlora._layout import axes_of, delta, fans, role_sizes
from jlora._paths import KeyPath, path_str
from jlora._resolve import resolve_sites
from jlora._split import combine, split
from jlora._targets import float_kernels

METHODS = ("pissa", "olora")


def factor_kernel(
    w: jax.Array, roles: tuple[str, ...], rank: int, scale: float, method: str, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    stack, fan_in, fan_out = role_sizes(w.shape, roles)
    perm = axes_of(roles, "stack") + axes_of(roles, "in") + axes_of(roles, "out")
    wide = jnp.promote_types(w.dtype, dtype)
    grouped = jnp.transpose(w.astype(wide), perm).reshape(*stack, *fans(w.shape, roles))
    if method == "pissa":
        u, s, vt = jnp.linalg.svd(grouped, full_matrices=False)
        root = jnp.sqrt(s[..., :rank] / scale)
        a = u[..., :rank] * root[..., None, :]
        b = root[..., :, None] * vt[..., :rank, :]
    else:
        q, r = jnp.linalg.qr(jnp.swapaxes(grouped, -1, -2))
        a = jnp.swapaxes(r[..., :rank, :], -1, -2)
        b = jnp.swapaxes(q[..., :, :rank], -1, -2)
    a = a.reshape(*stack, *fan_in, rank).astype(dtype)
    b = b.reshape(*stack, rank, *fan_out).astype(dtype)
    return a, b


def init_pissa(params: Any, config: LoraConfig, *, method: str = "pissa") -> Any:
    """Adds A and B from the SVD (PiSSA) or QR (OLoRA) of each selected kernel; W -> residual.

    Each selected kernel ``W`` becomes ``W - s·A·B`` and gets its ``k_lora_a`` / ``k_lora_b``
    siblings, so ``merge_params`` (or :func:`jlora.lora`) gives back ``W`` up to rounding
    (~1e-7 relative in float32). Deterministic: no PRNG key. Keep the returned adapter half
    (``jlora.split(out)[0]``) to convert the trained adapter later with :func:`pissa_to_lora`.

    Args:
      params: the base tree (nested dicts holding the kernels).
      config: what to adapt; ``rank``/``alpha`` (and patterns, rsLoRA) as for ``init_lora``.
      method: ``"pissa"`` (top-r SVD) or ``"olora"`` (QR, as PEFT's OLoRA).

    Returns:
      The adapted tree with residual kernels (same dtypes as the input kernels).

    Raises:
      ValueError: for an unknown method, targets that match nothing, a rank too large for a
        kernel, a kernel with no axis rule, a quantised kernel, or a kernel not held by a dict.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> w = jnp.arange(12.0).reshape(4, 3)
      >>> cfg = jlora.LoraConfig(rank=2)
      >>> p = init_pissa({"d": {"kernel": w}}, cfg)
      >>> bool(jnp.allclose(jlora.merge_params(p, cfg)["d"]["kernel"], w, atol=1e-5))
      True
    """
    if method not in METHODS:
        raise ValueError(
            f"init_pissa: method must be one of {METHODS} (PiSSA: SVD of W; OLoRA: QR of W); "
            f"got {method!r}"
        )
    planned: dict[KeyPath, tuple[Any, jax.Array, jax.Array]] = {}
    dtype = jnp.dtype(config.dtype)
    why = (
        "PiSSA/OLoRA replace the base by the residual W - s·A·B of the float kernel. Run "
        "init_pissa on the float base, then jlora.quantize the result (its residual kernels are "
        "what get quantised)"
    )
    for path, w, roles, rank, scale in float_kernels(params, config, "init_pissa", why):
        a, b = factor_kernel(w, roles, rank, scale, method, dtype)
        wide = jnp.promote_types(w.dtype, dtype)
        residual = (w.astype(wide) - delta(a, b, roles, scale).astype(wide)).astype(w.dtype)
        planned[path] = (residual, a, b)

    return place_factored(params, planned, "init_pissa")


def pissa_to_lora(params: Any, initial: Any, config: LoraConfig) -> Adapter:
    """A plain rank-``2r`` adapter against the original base, equal to a trained PiSSA/OLoRA one.

    With the residual base ``R = W - s·A₀·B₀``, the trained tree computes ``R + s·A·B``; as a
    change to the original ``W`` that is ``s·A·B - s·A₀·B₀ = s'·[A, A₀]·[B; -B₀]·(s/s')``, with
    ``s'`` the scale of the returned config (rank ``2r``; alpha doubled, or times ``sqrt(2)`` with
    rsLoRA, so that ``s' = s``). This is what PEFT saves for PiSSA/OLoRA adapters.

    Args:
      params: the trained adapted tree (residual kernels + adapters).
      initial: the adapter half of :func:`init_pissa`'s output, before training.
      config: the config given to :func:`init_pissa`.

    Returns:
      An :class:`jlora.Adapter` to combine with the ORIGINAL base (e.g. for ``export_peft``).

    Raises:
      ValueError: if ``initial`` does not line up with ``params`` or does not fit ``config``,
        or a kernel is DoRA.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> w = {"d": {"kernel": jnp.arange(12.0).reshape(4, 3)}}
      >>> cfg = jlora.LoraConfig(rank=1)
      >>> p = init_pissa(w, cfg)
      >>> plain = pissa_to_lora(p, jlora.split(p)[0], cfg)
      >>> plain.lora["d"]["kernel_lora_a"].shape, plain.config.rank
      ((4, 2), 2)
    """
    _, residual_base = split(params)
    trained = {a.site.path: a for a in resolve_sites(params, config)}
    start = {a.site.path: a for a in resolve_sites(combine(initial, residual_base), config)}
    if trained.keys() != start.keys():
        raise ValueError(
            f"pissa_to_lora: the initial adapters cover {sorted(map(path_str, start))} but the "
            f"trained tree {sorted(map(path_str, trained))}; pass split(init_pissa(...))[0] "
            "from the same init"
        )
    dora = [p.site.name for p in trained.values() if p.site.m is not None]
    if dora:
        raise ValueError(
            f"pissa_to_lora: {dora} are DoRA kernels ('*_lora_m' magnitudes); a renormalised "
            "kernel has no plain rank-2r form. Export the merged model (merge_params) instead"
        )
    factor = math.sqrt(2.0) if config.use_rslora else 2.0
    doubled = dataclasses.replace(
        config,
        rank=2 * config.rank,
        alpha=config.alpha * factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
    )
    factors = {}
    for path, now in trained.items():
        then = start[path]
        ns = now.roles.count("stack")
        ratio = now.scale / doubled.scale_for(now.site.name, 2 * now.rank)
        a = jnp.concatenate([now.site.a, then.site.a], axis=-1)
        b = jnp.concatenate([now.site.b, -then.site.b], axis=ns) * jnp.asarray(
            ratio, now.site.b.dtype
        )
        factors[path] = (a, b)
    return Adapter(place(residual_base, factors), doubled)
