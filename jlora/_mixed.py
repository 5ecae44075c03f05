"""Mixed-adapter batches: each row of one forward pass runs with its own named adapter.

When the rows' adapters are known at trace time (names, or concrete indices) the rows are
grouped by adapter and each group runs :func:`jlora.lora` with its own adapter, all in one
program; outputs are put back in row order. This costs the FLOPs of one batch, as PEFT's
per-adapter sub-batches do. When the indices are traced (decided inside ``jax.jit``), the
adapters are padded to a common rank per kernel (zero columns add exactly nothing), their
scales folded into B, and stacked with one extra all-zero adapter standing for the bare base;
each row gathers its factors and runs :func:`jlora.lora` under ``jax.vmap``, where the base
products of all rows batch into one ``x·W`` against the shared ``W``. ``W + s·A·B`` is never
formed, for any row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._adapters import Adapter, place, scaled_b, sites_by_name, unit_config
from jlora._factorised import lora
from jlora._layout import adapter_shapes
from jlora._paths import KeyPath, path_str
from jlora._qlora import dequantize
from jlora._split import combine


def _pad(x: jax.Array, axis: int, rank: int) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, rank - x.shape[axis])
    return jnp.pad(x, widths)


def _stacked(base: Any, adapters: Mapping[str, Adapter]) -> tuple[Any, Any]:
    """A lora tree whose leaves stack every adapter (then a zero 'base' adapter) on axis 0."""
    per, roles = sites_by_name(base, adapters, "mixed_batch with traced indices")
    factors: dict[KeyPath, tuple[jax.Array, jax.Array]] = {}
    plan = {}
    for path, kernel_roles in roles.items():
        ns = kernel_roles.count("stack")
        present = [per[n][path] for n in adapters if path in per[n]]
        rank = max(ad.rank for ad in present)
        a0, b0 = present[0].site.a, present[0].site.b
        a_shape, b_shape = adapter_shapes(present[0].site.kernel.shape, kernel_roles, rank)
        zero_a, zero_b = jnp.zeros(a_shape, a0.dtype), jnp.zeros(b_shape, b0.dtype)
        a_rows, b_rows = [], []
        for n in adapters:
            ad = per[n].get(path)
            a_rows.append(zero_a if ad is None else _pad(ad.site.a, a0.ndim - 1, rank))
            b_rows.append(zero_b if ad is None else _pad(scaled_b(ad), ns, rank))
        factors[path] = (jnp.stack([*a_rows, zero_a]), jnp.stack([*b_rows, zero_b]))
        plan[path] = (kernel_roles, rank)
    dtype = next(iter(adapters.values())).config.dtype
    return place(base, factors), unit_config(plan, dtype)


def _indices(rows: Any, names: list[str]) -> Any:
    """Row adapter indices, base (``None`` / ``-1``) as ``len(names)``; numpy if concrete."""
    n = len(names)
    if isinstance(rows, Sequence) and not isinstance(rows, str):
        if all(r is None or isinstance(r, str) for r in rows):
            for i, r in enumerate(rows):
                if r is not None and r not in names:
                    raise KeyError(
                        f"mixed_batch: row {i} names adapter {r!r}, which is not among "
                        f"{names}; use one of those, or None for the base"
                    )
            return np.asarray([n if r is None else names.index(r) for r in rows], np.int32)
    try:
        concrete = np.asarray(rows)
    except jax.errors.TracerArrayConversionError:
        concrete = None
    if concrete is None:
        # Under jit out-of-range indices cannot be refused: they gather NaN factors (a NaN row).
        idx = jnp.asarray(rows, jnp.int32)
        return jnp.where(idx == -1, n, jnp.where(idx < -1, n + 1, idx))
    if concrete.ndim != 1 or not np.issubdtype(concrete.dtype, np.integer):
        raise TypeError(
            "mixed_batch: rows must be adapter names (None = base) or a 1-D int array of "
            f"indices into {names} (-1 = base); got {concrete.dtype} of shape {concrete.shape}"
        )
    bad = np.flatnonzero((concrete < -1) | (concrete >= n))
    if bad.size:
        raise IndexError(
            f"mixed_batch: adapter index {int(concrete[bad[0]])} in row {int(bad[0])} is out "
            f"of range: found {n} adapters {names}, so indices must be in [-1, {n - 1}] "
            "(-1 = the base alone)"
        )
    return np.where(concrete == -1, n, concrete).astype(np.int32)


def _grouped(
    fn: Callable[..., Any], base: Any, adapters: Mapping[str, Adapter], idx: Any, args: Any
) -> Any:
    """Known rows: one factorised call per adapter on its rows, outputs put back in row order."""
    names, outs, order = list(adapters), [], []
    for k in np.unique(idx):
        mine = np.flatnonzero(idx == k)
        sub = jax.tree.map(lambda x, m=mine: x[m], args)
        if k == len(names):
            outs.append(fn(dequantize(base), *sub))  # a QLoRA base, bare: its dense kernels
        else:
            adapter = adapters[names[k]]
            outs.append(lora(fn, adapter.config)(combine(adapter.lora, base), *sub))
        order.append(mine)
    back = np.argsort(np.concatenate(order))
    return jax.tree.map(lambda *o: jnp.concatenate(o)[back], *outs)


def mixed_batch(
    fn: Callable[..., Any],
    base: Any,
    adapters: Mapping[str, Adapter],
    rows: Sequence[str | None] | Any,
    *args: Any,
) -> Any:
    """``fn(params_i, *args_i)`` for every row ``i`` at once, row ``i`` using adapter ``rows[i]``.

    Each row's output equals running that adapter alone (``jlora.lora(fn, config)`` on
    ``select_adapter(base, adapters, name)``) on that row, up to rounding; a ``None`` row is the
    bare base. Rows are the leading axis of every array in ``args``; ``fn`` is called on
    sub-batches of rows (or, for traced indices, on one-row slices under ``jax.vmap``), so it
    must treat rows independently.

    Args:
      fn: the model, ``fn(params, *args)``, as for :func:`jlora.lora`.
      base: the base params shared by all adapters (may be a QLoRA base from ``quantize``).
      adapters: ``{name: Adapter}``; any ranks, scales and subsets of targets (kernels an
        adapter does not adapt are left alone for its rows). DoRA adapters work with rows
        known at trace time (names or concrete indices), not with traced indices.
      rows: per row, an adapter name or ``None``; or a 1-D int array of indices into
        ``list(adapters)``, ``-1`` for the base (traceable; under ``jax.jit`` an out-of-range
        index cannot be refused and gives a NaN row).
      *args: the batched inputs, rows along axis 0.

    Returns:
      ``fn``'s output with rows along axis 0.

    Raises:
      KeyError: for a row naming no adapter.
      IndexError: for a concrete index outside ``[-1, len(adapters))``.
      ValueError: if ``args`` do not have ``len(rows)`` rows, ``adapters`` is empty, or a DoRA
        adapter meets traced indices.
      TypeError: for rows that are neither names nor a 1-D int array.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> cfg = jlora.LoraConfig(rank=2, targets="w")
      >>> base = {"w": jnp.ones((4, 3))}
      >>> la, _ = jlora.split(jlora.init_lora(jax.random.key(0), base, cfg))
      >>> la = {**la, "w_lora_b": jnp.ones((2, 3))}
      >>> bank = {"x": jlora.Adapter(la, cfg)}
      >>> f = lambda p, x: x @ p["w"]
      >>> y = mixed_batch(f, base, bank, ["x", None], jnp.ones((2, 4)))
      >>> bool(jnp.allclose(y[1], 4.0)), bool(jnp.allclose(y[0], 4.0))
      (True, False)
    """
    if not adapters:
        raise ValueError("mixed_batch: no adapters given; add some with jlora.add_adapter")
    names = list(adapters)
    idx = _indices(rows, names)
    for path, x in jax.tree.leaves_with_path(args):
        if getattr(x, "shape", ())[:1] != idx.shape:
            raise ValueError(
                f"mixed_batch: input args{path_str(path) and '/' + path_str(path)} has shape "
                f"{getattr(x, 'shape', ())}, but rows name {idx.shape[0]} rows; every input "
                "needs that many rows along axis 0"
            )
    if isinstance(idx, np.ndarray):
        return _grouped(fn, base, adapters, idx, args)
    stacked, config = _stacked(base, adapters)
    factorised = lora(fn, config)

    def one(i: jax.Array, *row: Any) -> Any:
        mine = jax.tree.map(
            lambda s: jnp.take(s, i, axis=0, mode="fill", fill_value=jnp.nan), stacked
        )
        out = factorised(combine(mine, base), *jax.tree.map(lambda x: x[None], row))
        return jax.tree.map(lambda o: o[0], out)

    return jax.vmap(one)(idx, *args)
