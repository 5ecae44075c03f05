"""Weighted combination of named adapters into one, as PEFT 0.21's ``add_weighted_adapter``.

The target is ``ΔW = Σ_i w_i·s_i·A_i·B_i`` per kernel (``s_i`` each adapter's own scale). The
factors are the ones ``peft==0.21`` ``LoraModel.add_weighted_adapter`` writes (``lora_A`` is
jlora's A, ``lora_B`` jlora's B, for a kernel laid out as its PyTorch module):

* ``cat``: ``A = [w_1·s_1·A_1, w_2·s_2·A_2, ...]`` and ``B = [B_1; B_2; ...]`` stacked along
  the rank axis (rank ``Σ r_i``): exactly the sum.
* ``linear``: with ``c_i = w_i·s_i``, ``A = Σ sign(c_i)·sqrt(|c_i|)·A_i`` and
  ``B = Σ sqrt(|c_i|)·B_i``: same rank, and cross terms ``A_i·B_j`` make it an approximation
  unless the adapters share a subspace.
* ``svd``: the exact sum per kernel, ``U·S·Vᵀ``, truncated to rank ``k``: ``A = U_k``,
  ``B = S_k·V_kᵀ`` (PEFT's ``lora_A = Vh``, ``lora_B = U·S`` on the transposed ``(out, in)``
  matrix), the best rank-``k`` part (Eckart–Young).

The result is an :class:`jlora.Adapter` whose config has scale 1 at every path, as PEFT's new
adapter (``r = lora_alpha = new rank``). Deliberate differences from PEFT: PEFT before 0.22
copied ``use_rslora`` from the first adapter into the new one, whose scale then was ``sqrt(r)``
rather than 1 (jlora keeps 1, so ``ΔW`` is the weighted sum, as PEFT 0.22 gives too); and PEFT
turns any combination of a single adapter into ``linear`` (ignoring ``svd_rank``), where jlora
keeps the method asked for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora._adapters import Adapter, place, sites_by_name, unit_config
from jlora._paths import KeyPath, path_str

METHODS = ("cat", "linear", "svd")


def _check(adapters: Mapping[str, Adapter], weights: Any, method: Any, rank: Any) -> None:
    if method not in METHODS:
        raise ValueError(f"combine_adapters: method must be one of {METHODS}; got {method!r}")
    if method == "svd":
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(
                f"combine_adapters(method='svd'): rank must be a positive int (or None for the "
                f"largest rank among the adapters, as PEFT's svd_rank=None); got rank={rank!r}"
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
    # All of S on B, as PEFT's lora_B = U·S of the transposed (out, in) matrix.
    a = u[..., :k].reshape(*stack, *fan_in, k)
    b = (s[..., :k, None] * vt[..., :k, :]).reshape(*stack, k, *fan_out)
    return a.astype(a0.dtype), b.astype(b0.dtype)


def combine_adapters(
    base: Any,
    adapters: Mapping[str, Adapter],
    weights: Mapping[str, float],
    *,
    method: str = "cat",
    rank: int | None = None,
) -> Adapter:
    """One adapter standing for ``Σ_i weights[i]·s_i·A_i·B_i``, as PEFT 0.21 combines adapters.

    The factors are those of ``peft==0.21`` ``add_weighted_adapter`` with the same
    ``combination_type``, each adapter's scale ``s_i`` taken into account (module docstring).

    Args:
      base: the base tree all the adapters belong to.
      adapters: the named adapters (``{name: Adapter}``).
      weights: ``{name: weight}`` for the adapters to combine (negative weights subtract).
      method: ``"cat"`` (exact; rank ``Σ r_i``), ``"linear"`` (PEFT's factor sum with
        ``sqrt(|w_i·s_i|)`` on both factors; equal ranks needed; approximate) or ``"svd"``
        (best rank-``rank`` approximation of the exact sum).
      rank: the target rank, for ``"svd"`` only (capped by each kernel's size); ``None`` takes
        the largest rank of the combined adapters, as PEFT's ``svd_rank=None``.

    Returns:
      An :class:`jlora.Adapter` with scale 1 at every path; ``select_adapter`` or ``combine``
      it with ``base`` like any other.

    Raises:
      ValueError: for an unknown method, an invalid ``rank`` or one given to another method,
        ``linear`` over different ranks (naming the kernel and both ranks), adapters that lay a
        kernel out differently, or DoRA adapters (renormalised kernels do not add).
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
      >>> combine_adapters(base, bank, {"x": 1.0, "y": 0.5}, method="svd").config.rank
      2
    """
    _check(adapters, weights, method, rank)
    chosen = {name: adapters[name] for name in weights}
    per, roles = sites_by_name(base, chosen, "combine_adapters")
    if method == "svd" and rank is None:
        rank = max(ad.rank for sites in per.values() for ad in sites.values())
    factors: dict[KeyPath, tuple[jax.Array, jax.Array]] = {}
    plan: dict[KeyPath, tuple[tuple[str, ...], int]] = {}
    for path, kernel_roles in roles.items():
        ns = kernel_roles.count("stack")
        # c_i = w_i·s_i: PEFT's "weight * target.scaling[adapter]".
        present = [
            (per[n][path], weights[n] * per[n][path].scale) for n in weights if path in per[n]
        ]
        if method == "cat":
            a = jnp.concatenate([ad.site.a * c for ad, c in present], axis=-1)
            b = jnp.concatenate([ad.site.b for ad, _ in present], axis=ns)
        elif method == "linear":
            ranks = {n: per[n][path].rank for n in weights if path in per[n]}
            if len(set(ranks.values())) > 1:
                raise ValueError(
                    f"combine_adapters(method='linear') adds factors, so every adapter needs "
                    f"the same rank at each kernel; at {path_str(path)!r} the ranks are {ranks}. "
                    "Use method='cat' (exact) or method='svd' with a target rank"
                )
            # The sign on A only: on both it would cancel (PEFT's comment says the same).
            a = sum(ad.site.a * math.copysign(math.sqrt(abs(c)), c) for ad, c in present)
            b = sum(ad.site.b * math.sqrt(abs(c)) for ad, c in present)
        else:
            terms = [(ad.site.a, ad.site.b * c) for ad, c in present]
            a, b = _svd(terms, ns, rank)  # type: ignore[arg-type]
        factors[path] = (a, b)
        plan[path] = (kernel_roles, a.shape[-1])
    dtype = next(iter(chosen.values())).config.dtype
    return Adapter(place(base, factors), unit_config(plan, dtype))
