"""Weighted combination of named adapters into one: ``cat`` (exact), ``linear``, ``svd``.

The target is ``ΔW = Σ_i w_i·s_i·A_i·B_i`` per kernel. ``cat`` stacks the factors along the rank
axis (rank ``Σ r_i``), which is that sum exactly. ``linear`` adds the factors themselves, as
PEFT does (``A = Σ sign(w_i)·sqrt(|w_i|)·s_i·A_i``, ``B = Σ sqrt(|w_i|)·B_i``): same rank, but
cross terms ``A_i·B_j`` make it an approximation unless the adapters share a subspace. ``svd``
forms the exact sum per kernel and keeps its best rank-``k`` part (Eckart–Young). The result is
an :class:`jlora.Adapter` whose config has scale 1 at every path (the scales are in B).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora._adapters import Adapter, place, scaled_b, sites_by_name, unit_config
from jlora._paths import KeyPath, path_str

METHODS = ("cat", "linear", "svd")


def _check(adapters: Mapping[str, Adapter], weights: Any, method: Any, rank: Any) -> None:
    if method not in METHODS:
        raise ValueError(f"combine_adapters: method must be one of {METHODS}; got {method!r}")
    if method == "svd":
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(
                f"combine_adapters(method='svd') needs the target rank, a positive int; got "
                f"rank={rank!r}"
            )
    elif rank is not None:
        raise ValueError(
            f"combine_adapters: rank= only applies to method='svd' (method {method!r} decides "
            f"the rank itself); got rank={rank!r}"
        )
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError(
            "combine_adapters: weights must be a non-empty mapping {adapter name: weight}; got "
            f"{weights!r}"
        )
    for name, w in weights.items():
        if name not in adapters:
            raise KeyError(
                f"combine_adapters: no adapter named {name!r}; the adapters are {sorted(adapters)}"
            )
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TypeError(f"combine_adapters: weight of {name!r} must be a number; got {w!r}")


def _grouped(a: jax.Array, b: jax.Array, ns: int) -> jax.Array:
    """``A·B`` as ``stack + (prod(in), prod(out))``."""
    stack = a.shape[:ns]
    a3 = a.reshape(*stack, -1, a.shape[-1])
    b3 = b.reshape(*stack, b.shape[ns], -1)
    return jnp.matmul(a3, b3, precision=jax.lax.Precision.HIGHEST)


def _svd(terms: list[tuple[jax.Array, jax.Array]], ns: int, rank: int) -> tuple[Any, Any]:
    a0, b0 = terms[0]
    stack, fan_in, fan_out = a0.shape[:ns], a0.shape[ns:-1], b0.shape[ns + 1 :]
    dense = sum(_grouped(a, b, ns) for a, b in terms)
    k = min(rank, math.prod(fan_in), math.prod(fan_out))
    u, s, vt = jnp.linalg.svd(dense, full_matrices=False)
    root = jnp.sqrt(s[..., :k])
    a = (u[..., :k] * root[..., None, :]).reshape(*stack, *fan_in, k)
    b = (root[..., :, None] * vt[..., :k, :]).reshape(*stack, k, *fan_out)
    return a.astype(a0.dtype), b.astype(b0.dtype)


def combine_adapters(
    base: Any,
    adapters: Mapping[str, Adapter],
    weights: Mapping[str, float],
    *,
    method: str = "cat",
    rank: int | None = None,
) -> Adapter:
    """One adapter standing for ``Σ_i weights[i]·ΔW_i``: concatenated, added or SVD-truncated.

    Args:
      base: the base tree all the adapters belong to.
      adapters: the named adapters (``{name: Adapter}``).
      weights: ``{name: weight}`` for the adapters to combine.
      method: ``"cat"`` (exact; rank ``Σ r_i``), ``"linear"`` (PEFT's factor sum; equal ranks
        needed) or ``"svd"`` (best rank-``rank`` approximation of the exact sum).
      rank: the target rank, for ``"svd"`` only (capped by each kernel's size).

    Returns:
      An :class:`jlora.Adapter` with scale 1 at every path; ``select_adapter`` or ``combine``
      it with ``base`` like any other.

    Raises:
      ValueError: for an unknown method, a missing/extra ``rank``, ``linear`` over different
        ranks (naming the kernel and both ranks), adapters that lay a kernel out differently,
        or DoRA adapters (renormalised kernels do not add).
      KeyError: for a weight naming no adapter.
      TypeError: for weights that are not a mapping of numbers.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> cfg = jlora.LoraConfig(rank=2)
      >>> base = {"d": {"kernel": jnp.ones((4, 3))}}
      >>> la, _ = jlora.split(jlora.init_lora(jax.random.key(0), base, cfg))
      >>> bank = {"x": jlora.Adapter(la, cfg), "y": jlora.Adapter(la, cfg)}
      >>> both = combine_adapters(base, bank, {"x": 1.0, "y": 0.5})
      >>> both.lora["d"]["kernel_lora_a"].shape, both.config.scale_for("d/kernel")
      ((4, 4), 1.0)
    """
    _check(adapters, weights, method, rank)
    chosen = {name: adapters[name] for name in weights}
    per, roles = sites_by_name(base, chosen, "combine_adapters")
    factors: dict[KeyPath, tuple[jax.Array, jax.Array]] = {}
    plan: dict[KeyPath, tuple[tuple[str, ...], int]] = {}
    for path, kernel_roles in roles.items():
        ns = kernel_roles.count("stack")
        present = [(n, per[n][path]) for n in weights if path in per[n]]
        if method == "cat":
            a = jnp.concatenate([ad.site.a for _, ad in present], axis=-1)
            b = jnp.concatenate([scaled_b(ad, weights[n]) for n, ad in present], axis=ns)
        elif method == "linear":
            ranks = {n: ad.rank for n, ad in present}
            if len(set(ranks.values())) > 1:
                raise ValueError(
                    f"combine_adapters(method='linear') adds factors, so every adapter needs "
                    f"the same rank at each kernel; at {path_str(path)!r} the ranks are {ranks}. "
                    "Use method='cat' (exact) or method='svd' with a target rank"
                )
            a = sum(
                ad.site.a * (math.copysign(math.sqrt(abs(weights[n])), weights[n]) * ad.scale)
                for n, ad in present
            )
            b = sum(ad.site.b * math.sqrt(abs(weights[n])) for n, ad in present)
        else:
            terms = [(ad.site.a, scaled_b(ad, weights[n])) for n, ad in present]
            a, b = _svd(terms, ns, rank)  # type: ignore[arg-type]
        factors[path] = (a, b)
        plan[path] = (kernel_roles, a.shape[-1])
    dtype = next(iter(chosen.values())).config.dtype
    return Adapter(place(base, factors), unit_config(plan, dtype))
