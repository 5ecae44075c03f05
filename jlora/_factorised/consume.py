"""Consuming an adapted kernel: the factorised form of each primitive that uses it.

Each rule computes the primitive's output for ``W + s·A·B`` as ``op(x, W) + s·((x·A)·B)``:
the base term is the original primitive on the concrete ``w``; the low-rank term runs two thin
contractions. For speed on XLA:CPU they see 2-D ``[tokens, features]`` operands (the leading
axes flattened), the scale multiplies ``B`` (``r x out``), never a W-sized or output-sized
array, and at small rank the second one is elementwise, fused into the sum with the base term
(:func:`low_rank_product`). LoRA dropout, when on, is applied to the adapter's input only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.extend import core

from jlora._factorised.dora import input_scale, output_scale, split_magnitude
from jlora._factorised.dropout import Dropout
from jlora._factorised.primitive_params import PrimitiveParams
from jlora._factorised.quantized_view import use
from jlora._factorised.rule import Context, Unsupported, register
from jlora._factorised.value import LoraValue

# Up to this rank the second low-rank product runs as elementwise multiply-adds (`_widen`),
# which XLA:CPU fuses with the consumer; above it, as a matmul (docs/performance.md,
# `benchmarks/op_profile.py`).
FUSED_MAX_RANK = 8


def _expand(h: jax.Array, f: jax.Array) -> jax.Array:
    """``h @ f`` for a thin ``h [T, r]``, written as r broadcast products summed pairwise.

    A pairwise sum rather than a running one: the r products are independent, so the
    vectorised loop is not one chain of r dependent adds per element (faster on XLA:CPU;
    ``benchmarks/op_profile.py``, numbers on docs/performance.md).
    """
    acc_dtype = jnp.promote_types(h.dtype, jnp.float32)  # bf16 products still sum in f32
    hf, ff = h.astype(acc_dtype), f.astype(acc_dtype)
    terms = [hf[:, i : i + 1] * ff[i] for i in range(h.shape[1])]
    while len(terms) > 1:
        pairs = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
        terms = pairs + terms[len(pairs) * 2 :]
    return terms[0].astype(h.dtype)


def _expand_as_reduction(h: jax.Array, f: jax.Array) -> jax.Array:
    """``h @ f`` as one broadcast product reduced over the rank axis (for training).

    Under autodiff XLA:CPU fuses this reduction, the base product ``x·W`` and their sum into
    one YNNPACK op, so the output is written once and the fusions that read it (gelu and its
    derivative) no longer recompute the low-rank term: ``benchmarks/train_step.py``'s step
    went from 1.15x to 1.11-1.12x the limit in summed single-threaded op time, temp memory
    unchanged. Without autodiff the same form let YNNPACK fuse whole MLP blocks into slower
    ops (forward 1.25x the base against 1.11x), so the forward keeps :func:`_expand`.
    """
    acc_dtype = jnp.promote_types(h.dtype, jnp.float32)
    product = h.astype(acc_dtype)[:, :, None] * f.astype(acc_dtype)[None]
    return jnp.sum(product, axis=1).astype(h.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _widen(h: jax.Array, f: jax.Array, precision: Any) -> jax.Array:
    """``h @ f`` for ``h [T, r]``, ``f [r, O]``: elementwise forward, matmul derivatives.

    A matmul's ``[T, O]`` result is a buffer that the next op (the sum with ``x·W``) reads
    back. As r multiply-adds it is an elementwise expression that XLA fuses into that
    consumer, so the low-rank term writes and reads no activation-sized buffer. Its tangent
    stays a matmul, so reverse mode transposes it to the matmuls ``dy·fᵀ`` and ``hᵀ·dy``
    (not to r reductions over ``dy``), and forward mode works as for any matmul. When
    differentiated, the primal value comes from :func:`_expand_as_reduction` instead.
    """
    return _expand(h, f)


@functools.partial(_widen.defjvp, symbolic_zeros=True)
def _widen_jvp(precision: Any, primals: tuple, tangents: tuple) -> tuple:
    h, f = primals
    dh, df = tangents
    y = _expand_as_reduction(h, f)
    dims = (((1,), (0,)), ((), ()))
    # JAX calls this rule only when at least one of the two tangents is not a symbolic zero.
    terms = [
        lax.dot_general(a, b.astype(a.dtype), dims, precision=precision)
        for a, b in ((dh, f), (h, df))
        if not isinstance(a, SymbolicZero) and not isinstance(b, SymbolicZero)
    ]
    return y, sum(terms[1:], terms[0]).astype(y.dtype)


def low_rank_product(h: jax.Array, f: jax.Array, precision: Any, pref: Any) -> jax.Array:
    """``h @ f`` for the rank-r intermediate ``h [T, r]`` and ``f [r, O]``.

    Elementwise (fused into the consumer) up to :data:`FUSED_MAX_RANK`, a matmul above it.
    """
    f = f.astype(h.dtype)
    if 0 < h.shape[1] <= FUSED_MAX_RANK:
        return _widen(h, f, precision)
    dims = (((1,), (0,)), ((), ()))
    return lax.dot_general(h, f, dims, precision=precision, preferred_element_type=pref)


def _thin(
    x: jax.Array, f1: jax.Array, f2: jax.Array, scale: float, precision: Any, pref: Any
) -> jax.Array:
    """``(x @ f1) @ (scale * f2)`` for 2-D ``x [T, K]``, ``f1 [K, r]``, ``f2 [r, O]``.

    The scale multiplies ``f2`` (``r x O``), the smallest operand. ``x @ f1`` is written as
    ``x @ (f1ᵀ)ᵀ`` with ``f1ᵀ`` behind an optimisation barrier, so that autodiff computes
    ``f1``'s gradient as ``(dhᵀ @ x)ᵀ``: a wide ``[r, K]`` product and a small transpose.
    Left alone, XLA folds that transpose into the product, and the ``[K, r]``-shaped
    ``xᵀ @ dh`` it then runs over the token axis was up to 20x slower on XLA:CPU (2.7 ms
    against 0.13 ms at T=2048, K=1024, r=8), more than the base ``x @ W``. The second
    product is :func:`low_rank_product`, which fuses into the sum with the base term.
    """
    f1_t = lax.optimization_barrier(f1.T)
    dims = (((1,), (1,)), ((), ()))
    h = lax.dot_general(x, f1_t, dims, precision=precision, preferred_element_type=pref)
    return low_rank_product(h, f2.astype(h.dtype) * jnp.asarray(scale, h.dtype), precision, pref)


def dot_general(drop: Dropout, params: Mapping[str, Any], lhs: Any, rhs: Any) -> jax.Array:
    """``dot_general`` with an adapted kernel on one side and a plain array on the other.

    The kernel's contracted axes must be exactly its ``in`` axes (``x·W``; then the delta is
    ``(x·A)·B``) or exactly its ``out`` axes (``x·Wᵀ`` as in tied embeddings; then
    ``(x·Bᵀ)·Aᵀ``); its batch axes must be exactly its ``stack`` axes.
    """
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    on_left = isinstance(lhs, LoraValue)
    if on_left and isinstance(rhs, LoraValue):
        raise Unsupported("a product of two adapted kernels")
    v, x = (lhs, rhs) if on_left else (rhs, lhs)
    v, mag = split_magnitude(v)  # DoRA: m / ||W + s·A·B||, applied to the output below
    kc, kb, xc, xb = (lc, lb, rc, rb) if on_left else (rc, rb, lc, lb)
    if mag is not None and set(kc) == set(v.group("out")):
        # Contracted (x·Wᵀ, tied embeddings), DoRA's per-out-unit scale meets x's axes instead.
        x = x * input_scale(mag, v.roles, kb, kc, xb, xc, x.shape).astype(x.dtype)
        mag = None
    base = use(
        v.w, lambda w, x: lax.dot_general_p.bind(*((w, x) if on_left else (x, w)), **params), x
    )
    if set(kb) != set(v.group("stack")):
        raise Unsupported(
            f"batch axes {tuple(kb)} of the kernel are not its stack axes {v.group('stack')}"
        )
    ns, rank = len(v.group("stack")), v.a.shape[-1]
    if set(kc) == set(v.group("in")):
        first, second = v.group("in"), v.group("out")
        f1 = v.a  # stack + in + (r,)
        f2 = v.b  # stack + (r,) + out
        f1_axis = {ax: ns + i for i, ax in enumerate(first)}
    elif set(kc) == set(v.group("out")):
        first, second = v.group("out"), v.group("in")
        f1 = jnp.moveaxis(v.b, ns, -1)  # stack + out + (r,)
        f2 = jnp.moveaxis(v.a, -1, ns)  # stack + (r,) + in
        f1_axis = {ax: ns + i for i, ax in enumerate(first)}
    else:
        raise Unsupported(
            f"contracting axes {tuple(kc)} of the kernel are neither all its 'in' axes "
            f"{v.group('in')} nor all its 'out' axes {v.group('out')}"
        )
    dtype = x.dtype
    f1, f2 = f1.astype(dtype), f2.astype(dtype)
    xd = drop.apply(x)
    prec, pref = params.get("precision"), params.get("preferred_element_type")
    x_free = [d for d in range(x.ndim) if d not in xc and d not in xb]
    out_shape = [x.shape[d] for d in x_free] + [v.shape[d] for d in second]
    if not kb:
        # Order x's contracted axes like the kernel's first group, then flatten to 2-D.
        order = sorted(range(len(kc)), key=lambda i: f1_axis[kc[i]])
        perm = x_free + [xc[i] for i in order]
        if perm != list(range(x.ndim)):
            xd = jnp.transpose(xd, perm)
        k = math.prod(v.shape[d] for d in first)
        t = math.prod(x.shape[d] for d in x_free)
        y = _thin(xd.reshape(t, k), f1.reshape(k, rank), f2.reshape(rank, -1), v.scale, prec, pref)
        y = y.reshape(out_shape)
    else:
        # Stacked (per-layer / per-expert) products keep their batch axes. As in `_thin`, the
        # first factor enters with its rank axis ahead of its `in` axes and behind a barrier,
        # so that its gradient is the wide `(dhᵀ·x)ᵀ` per stack entry, not `xᵀ·dh` (faster:
        # `benchmarks/experts_step.py`).
        stack_pos = {ax: i for i, ax in enumerate(v.group("stack"))}
        f1_t = lax.optimization_barrier(jnp.moveaxis(f1, -1, ns))  # stack + (r,) + first
        dims1 = (
            (tuple(xc), tuple(f1_axis[a] + 1 for a in kc)),
            (tuple(xb), tuple(stack_pos[a] for a in kb)),
        )
        h = lax.dot_general(xd, f1_t, dims1, precision=prec, preferred_element_type=pref)
        f2 = f2.astype(h.dtype) * jnp.asarray(v.scale, h.dtype)
        dims2 = (((h.ndim - 1,), (ns,)), (tuple(range(len(kb))), tuple(stack_pos[a] for a in kb)))
        y = lax.dot_general(h, f2, dims2, precision=prec, preferred_element_type=pref)
        out_shape = [x.shape[d] for d in xb] + out_shape
    if on_left:
        nb, nx = len(kb), len(x_free)
        y = jnp.transpose(y, [*range(nb), *range(nb + nx, y.ndim), *range(nb, nb + nx)])
    if mag is not None:
        out = base + y.astype(base.dtype)
        return out * output_scale(mag, kb, len(x_free), on_left).astype(out.dtype)
    return base + y.astype(base.dtype)


@register("dot_general")
def dot_general_rule(ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
    """``x·W + s·((x·A)·B)`` for products and einsums (also ``x·Wᵀ``, and per stack entry)."""
    return [dot_general(ctx.dropout, PrimitiveParams(eqn), *invals)]


def conv(drop: Dropout, params: Mapping[str, Any], x: Any, v: Any) -> jax.Array:
    """``conv_general_dilated`` with an adapted kernel: ``conv(x, W) + s·conv(x, A)·B``.

    Grouped and depthwise convolutions included; ``batch_group_count > 1`` is refused.
    """
    if isinstance(x, LoraValue) or not isinstance(v, LoraValue):
        raise Unsupported("an adapted kernel as the input (lhs) of a convolution")
    v, mag = split_magnitude(v)  # DoRA: m / ||W + s·A·B||, applied to the output below
    base = use(v.w, lambda w, x: lax.conv_general_dilated_p.bind(x, w, **params), x)
    dn = params["dimension_numbers"]
    out_axis, out_feature = dn.rhs_spec[0], dn.out_spec[1]
    if v.group("out") != (out_axis,) or v.group("stack"):
        raise Unsupported(
            f"kernel axis roles {v.roles} do not match the convolution, whose output-feature "
            f"axis is {out_axis} (expected that axis alone 'out', all others 'in')"
        )
    if params["batch_group_count"] != 1:
        raise Unsupported("a convolution with batch_group_count > 1")
    # Grouped (G > 1, depthwise when each group has one input channel): group g's outputs see
    # only group g's inputs, so each group runs A on its own inputs (A repeated G times along
    # the output features) and B's columns of group g then mix that group's r features only.
    groups, rank = params["feature_group_count"], v.a.shape[-1]
    a_kernel = jnp.moveaxis(v.a, -1, out_axis).astype(x.dtype)
    a_kernel = jnp.concatenate([a_kernel] * groups, axis=out_axis) if groups > 1 else a_kernel
    h = lax.conv_general_dilated_p.bind(drop.apply(x), a_kernel, **params)
    h = jnp.moveaxis(h, out_feature, -1)
    lead = h.shape[:-1]
    prec, pref = params.get("precision"), params.get("preferred_element_type")
    b = v.b.astype(h.dtype) * jnp.asarray(v.scale, h.dtype)
    if groups == 1:
        y = low_rank_product(h.reshape(-1, rank), b, prec, pref).reshape(*lead, -1)
    else:
        dims = (((2,), (0,)), ((1,), (1,)))  # per group g: [T, r] · [r, out / G]
        b = b.reshape(rank, groups, -1)
        y = lax.dot_general(
            h.reshape(-1, groups, rank), b, dims, precision=prec, preferred_element_type=pref
        )
        y = jnp.moveaxis(y, 0, 1).reshape(*lead, -1)
    y = jnp.moveaxis(y, -1, out_feature)
    if mag is not None:
        out = base + y.astype(base.dtype)
        shape = [-1 if d == out_feature else 1 for d in range(out.ndim)]
        return out * mag.reshape(shape).astype(out.dtype)
    return base + y.astype(base.dtype)


@register("conv_general_dilated")
def conv_rule(ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
    """``conv(x, W) + s·conv(x, A)·B``, grouped and depthwise convolutions included."""
    return [conv(ctx.dropout, PrimitiveParams(eqn), *invals)]


def _offset_axis(dn: Any, ndim: int, axis: int) -> int:
    """The output position of operand axis ``axis`` in a gather (it must be an offset axis)."""
    skipped = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
    kept = [d for d in range(ndim) if d not in skipped]
    return dn.offset_dims[kept.index(axis)]


def gather(params: Mapping[str, Any], v: Any, indices: Any) -> jax.Array:
    """Row lookup in an adapted table (``Embed``): ``W[ids] + s·A[ids]·B``.

    The lookup may index any ``in`` axes; the single ``out`` axis must be taken whole.
    """
    if not isinstance(v, LoraValue) or isinstance(indices, LoraValue):
        raise Unsupported("an adapted kernel used as gather indices")
    v, mag = split_magnitude(v)  # DoRA: m / ||W + s·A·B||, per 'out' unit of the looked-up rows
    dn, sizes = params["dimension_numbers"], params["slice_sizes"]
    base = use(v.w, lambda w, i: lax.gather_p.bind(w, i, **params), indices)
    outs = v.group("out")
    if len(outs) != 1 or v.group("stack"):
        raise Unsupported(f"a lookup in a kernel with roles {v.roles} (one 'out' axis needed)")
    out = outs[0]
    indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims)
    if out in indexed or sizes[out] != v.shape[out]:
        raise Unsupported(f"a gather that indexes the kernel's 'out' axis {out}")
    rank = v.a.shape[-1]
    table = jnp.moveaxis(v.a, -1, out)
    a_sizes = tuple(rank if d == out else s for d, s in enumerate(sizes))
    h = lax.gather_p.bind(table, indices, **{**params, "slice_sizes": a_sizes})
    pos = _offset_axis(dn, len(v.shape), out)
    h = jnp.moveaxis(h, pos, -1)
    lead = h.shape[:-1]
    b = v.b.astype(h.dtype) * jnp.asarray(v.scale, h.dtype)
    y = low_rank_product(h.reshape(-1, rank), b, None, None)
    y = jnp.moveaxis(y.reshape(*lead, -1), -1, pos)
    out = base + y.astype(base.dtype)
    if mag is not None:
        out = out * mag.reshape([-1 if d == pos else 1 for d in range(out.ndim)]).astype(out.dtype)
    return out


@register("gather")
def gather_rule(ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
    """``W[ids] + s·A[ids]·B`` for embedding lookups (no dropout: the input is an index)."""
    return [gather(PrimitiveParams(eqn), *invals)]
