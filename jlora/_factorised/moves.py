"""The moves of an adapted kernel: ops that change its view but not its low-rank form.

Casts, copies and sharding constraints act on ``w`` alone. Transposes, group-preserving
reshapes (``squeeze`` and ``expand_dims`` among them), static and traced slices of ``stack``
axes, and concatenations move ``w`` and permute, reshape, slice or join the matching groups of
``a`` (``stack + in + (r,)``) and ``b`` (``stack + (r,) + out``), so the invariant of
:class:`~jlora._factorised.value.LoraValue` holds after every move. A move that would mix two
axis roles (a reshape merging ``in`` and ``out`` axes, a slice of an ``in`` axis) is
:class:`~jlora._factorised.rule.Unsupported`. Each move's rule is registered beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core

from jlora._factorised.primitive_params import PrimitiveParams
from jlora._factorised.quantized_view import dense, then
from jlora._factorised.rule import Context, Unsupported, bind, register
from jlora._factorised.value import LoraValue
from jlora._layout import ROLES, axes_of


def _moved(invals: list[Any]) -> tuple[LoraValue, list[Any]]:
    """The moved kernel and the op's other operands, which must all be plain arrays."""
    v, *rest = invals
    if not isinstance(v, LoraValue) or any(isinstance(r, LoraValue) for r in rest):
        raise Unsupported("an adapted kernel used as an operand other than the array moved")
    return v, rest


@register("convert_element_type", "copy", "copy_p", "sharding_constraint")
def on_w(ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
    """Applies the op to ``w`` only (a cast, a copy, a sharding constraint); A and B unchanged."""
    v, rest = _moved(invals)
    return [v.replace(w=then(v.w, lambda w: bind(eqn, [w, *rest])[0]))]


def _group_perm(roles: Sequence[str], perm: Sequence[int], role: str) -> list[int]:
    old = axes_of(roles, role)
    return [old.index(p) for p in perm if roles[p] == role]


def transpose(v: LoraValue, perm: Sequence[int]) -> LoraValue:
    """The kernel with its axes permuted: ``w`` transposed, each group of A and B permuted."""
    ns = len(v.group("stack"))
    stack = _group_perm(v.roles, perm, "stack")
    a_perm = [*stack, *(ns + i for i in _group_perm(v.roles, perm, "in")), ns + len(v.group("in"))]
    b_perm = [*stack, ns, *(ns + 1 + i for i in _group_perm(v.roles, perm, "out"))]
    return v.replace(
        w=then(v.w, lambda w: jax.lax.transpose(w, tuple(perm))),
        a=jnp.transpose(v.a, a_perm),
        b=jnp.transpose(v.b, b_perm),
        roles=tuple(v.roles[p] for p in perm),
    )


@register("transpose")
def transpose_rule(ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
    """Permutes ``w``, and A's and B's axes within each role group."""
    v, _ = _moved(invals)
    return [transpose(v, PrimitiveParams(eqn)["permutation"])]


def _new_roles(roles: Sequence[str], shape: Sequence[int], new: Sequence[int]) -> list[str]:
    """Roles of the new axes of a reshape, or :class:`Unsupported` if it mixes two roles.

    Old and new axes are cut into the smallest consecutive segments of equal size (the usual
    reshape decomposition, size-1 axes aside); each segment must lie inside one role, and its
    new axes get that role. Size-1 new axes take their neighbour's role.
    """
    old = [(n, r) for n, r in zip(shape, roles, strict=True) if n != 1]
    out: list[str | None] = [None] * len(new)
    mixed = Unsupported(
        f"a reshape {tuple(shape)} -> {tuple(new)} that mixes the kernel's {tuple(roles)} "
        "axis groups"
    )
    i = j = 0
    while j < len(new):
        if new[j] == 1:
            j += 1
            continue
        if i >= len(old):
            raise mixed
        prod_old, seg_roles = old[i][0], {old[i][1]}
        prod_new, seg = new[j], [j]
        i, j = i + 1, j + 1
        while prod_old != prod_new:
            if prod_old < prod_new and i < len(old):
                prod_old, i = prod_old * old[i][0], i + 1
                seg_roles.add(old[i - 1][1])
            elif prod_new < prod_old and j < len(new):
                prod_new, j = prod_new * new[j], j + 1
                seg.append(j - 1)
            else:
                raise mixed
        if len(seg_roles) != 1:
            raise mixed
        (role,) = seg_roles
        for k in seg:
            out[k] = role
    known = [r for r in out if r is not None]
    fill = known[0] if known else "in"
    filled = []
    for r in out:
        fill = r if r is not None else fill
        filled.append(fill)
    return filled


def reshape(v: LoraValue, new_shape: Sequence[int]) -> LoraValue:
    """The kernel reshaped, allowed when no new axis mixes two roles (in, out, stack)."""
    new_roles = _new_roles(v.roles, v.shape, new_shape)
    sizes = {r: [n for n, rr in zip(new_shape, new_roles, strict=True) if rr == r] for r in ROLES}
    rank = v.a.shape[-1]
    return v.replace(
        w=then(v.w, lambda w: jnp.reshape(w, tuple(new_shape))),
        a=jnp.reshape(v.a, (*sizes["stack"], *sizes["in"], rank)),
        b=jnp.reshape(v.b, (*sizes["stack"], rank, *sizes["out"])),
        roles=tuple(new_roles),
    )


@register("reshape")
def reshape_rule(ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
    """Reshapes ``w`` and each role group of A and B; refused if a new axis mixes two roles."""
    v, _ = _moved(invals)
    p = PrimitiveParams(eqn)
    if p.get("dimensions") is not None:
        raise Unsupported("a reshape with a dimension permutation")
    return [reshape(v, p["new_sizes"])]


def squeeze(v: LoraValue, dimensions: Sequence[int]) -> LoraValue:
    """The kernel with size-1 axes removed, from ``w`` and from the factor that holds them."""
    drop = set(dimensions)
    return reshape(v, [n for i, n in enumerate(v.shape) if i not in drop])


@register("squeeze")
def squeeze_rule(ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
    """Drops size-1 axes from ``w`` and from the factor that holds each."""
    v, _ = _moved(invals)
    return [squeeze(v, PrimitiveParams(eqn)["dimensions"])]


def _stack_only(v: LoraValue, full: Sequence[bool], what: str) -> None:
    for i, (role, is_full) in enumerate(zip(v.roles, full, strict=True)):
        if role != "stack" and not is_full:
            raise Unsupported(
                f"{what} that cuts axis {i} of the kernel, a {role!r} axis (only 'stack' axes, "
                "the layer/expert axes, may be sliced)"
            )


def _factor_index(v: LoraValue, per_axis: Sequence[Any], fill: Any) -> tuple[list[Any], list[Any]]:
    stack = [per_axis[i] for i in v.group("stack")]
    a = stack + [fill] * (v.a.ndim - len(stack))
    b = stack + [fill] * (v.b.ndim - len(stack))
    return a, b


def slice_(v: LoraValue, start: Sequence[int], limit: Sequence[int], strides: Any) -> LoraValue:
    """A static slice of stack axes (``w[1]``, ``w[::2]``); other axes must be taken whole."""
    _stack_only(
        v, [s == 0 and e == n for s, e, n in zip(start, limit, v.shape, strict=True)], "a slice"
    )
    steps = list(strides) if strides is not None else [1] * len(start)
    a_start, b_start = _factor_index(v, start, 0)
    a_step, b_step = _factor_index(v, steps, 1)
    a_lim = [*(limit[i] for i in v.group("stack")), *v.a.shape[len(v.group("stack")) :]]
    b_lim = [*(limit[i] for i in v.group("stack")), *v.b.shape[len(v.group("stack")) :]]
    return v.replace(
        w=then(v.w, lambda w: jax.lax.slice(w, tuple(start), tuple(limit), strides)),
        a=jax.lax.slice(v.a, tuple(a_start), tuple(a_lim), tuple(a_step)),
        b=jax.lax.slice(v.b, tuple(b_start), tuple(b_lim), tuple(b_step)),
    )


@register("slice")
def slice_rule(ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
    """Slices ``stack`` axes of ``w``, A and B statically; other axes must be taken whole."""
    v, _ = _moved(invals)
    p = PrimitiveParams(eqn)
    return [slice_(v, p["start_indices"], p["limit_indices"], p["strides"])]


def dynamic_slice(v: LoraValue, starts: Sequence[Any], sizes: Sequence[int]) -> LoraValue:
    """A traced-index slice of stack axes (``w[i]`` in a Python loop over layers)."""
    _stack_only(v, [s == n for s, n in zip(sizes, v.shape, strict=True)], "a dynamic slice")
    zero = jnp.zeros((), jnp.int32)
    a_start, b_start = _factor_index(v, starts, zero)
    ns = len(v.group("stack"))
    stack_sizes = [sizes[i] for i in v.group("stack")]
    return v.replace(
        w=then(v.w, lambda w: jax.lax.dynamic_slice(w, list(starts), tuple(sizes))),
        a=jax.lax.dynamic_slice(v.a, a_start, (*stack_sizes, *v.a.shape[ns:])),
        b=jax.lax.dynamic_slice(v.b, b_start, (*stack_sizes, *v.b.shape[ns:])),
    )


@register("dynamic_slice")
def dynamic_slice_rule(ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
    """Slices ``stack`` axes at traced indices (``w[i]`` in a Python loop over layers)."""
    v, starts = _moved(invals)
    return [dynamic_slice(v, starts, PrimitiveParams(eqn)["slice_sizes"])]


def broadcast_in_dim(v: LoraValue, shape: Sequence[int]) -> LoraValue:
    """``expand_dims`` spelled as a broadcast: only inserting size-1 axes is allowed."""
    if math.prod(shape) != math.prod(v.shape):
        raise Unsupported(f"broadcasting the kernel from {v.shape} to {tuple(shape)}")
    return reshape(v, shape)


@register("broadcast_in_dim")
def broadcast_rule(ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
    """Inserts size-1 axes (``expand_dims``); a broadcast that copies or permutes is refused."""
    v, _ = _moved(invals)
    p = PrimitiveParams(eqn)
    if list(p["broadcast_dimensions"]) != sorted(p["broadcast_dimensions"]):
        raise Unsupported("a broadcast that permutes the kernel's axes")
    return [broadcast_in_dim(v, p["shape"])]


def _factors(part: Any, like: LoraValue) -> tuple[Any, Any, Any]:
    """``(w, a, s·b)`` of a concatenated part; a plain array is a rank-0 adapted kernel."""
    if isinstance(part, LoraValue):
        if part.dora:
            raise Unsupported("a concatenation of DoRA kernels (each renormalises on its own)")
        return dense(part.w), part.a, part.b * jnp.asarray(part.scale, part.b.dtype)
    sizes = {r: [part.shape[i] for i in like.group(r)] for r in ROLES}
    a = jnp.zeros((*sizes["stack"], *sizes["in"], 0), like.a.dtype)
    b = jnp.zeros((*sizes["stack"], 0, *sizes["out"]), like.b.dtype)
    return part, a, b


def _pad_rank(x: Any, axis: int, before: int, total: int) -> Any:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, total - before - x.shape[axis])
    return jnp.pad(x, widths)


def concatenate(parts: Sequence[Any], dimension: int) -> LoraValue:
    """Kernels joined along one axis (a fused qkv built from separate kernels): still low rank.

    With each part's scale folded into its B, ``[W₁ + A₁B₁ | W₂ + A₂B₂]`` along an ``out``
    axis is ``[W₁ | W₂] + [A₁ A₂]·blockdiag(B₁, B₂)``: rank ``r₁ + r₂``, factors of adapter
    size. Along an ``in`` axis A is block-diagonal instead; along a stack axis the ranks are
    zero-padded to the largest. Plain (unadapted) parts join with rank 0. The parts must agree
    on the axis roles.
    """
    like = next(p for p in parts if isinstance(p, LoraValue))
    for p in parts:
        if isinstance(p, LoraValue) and p.roles != like.roles:
            raise Unsupported(
                f"a concatenation of kernels with different axis roles {like.roles} and {p.roles}"
            )
    ws, a_s, b_s = zip(*(_factors(p, like) for p in parts), strict=True)
    role, ns = like.roles[dimension], len(like.group("stack"))
    ranks = [a.shape[-1] for a in a_s]
    offsets = [sum(ranks[:i]) for i in range(len(ranks))]
    if role == "out":
        axis = ns + 1 + like.group("out").index(dimension)
        a = jnp.concatenate(a_s, axis=-1)
        b = jnp.concatenate(
            [_pad_rank(b, ns, o, sum(ranks)) for b, o in zip(b_s, offsets, strict=True)], axis
        )
    elif role == "in":
        axis = ns + like.group("in").index(dimension)
        a = jnp.concatenate(
            [_pad_rank(a, a.ndim - 1, o, sum(ranks)) for a, o in zip(a_s, offsets, strict=True)],
            axis,
        )
        b = jnp.concatenate(b_s, axis=ns)
    else:
        axis, top = like.group("stack").index(dimension), max(ranks)
        a = jnp.concatenate([_pad_rank(a, a.ndim - 1, 0, top) for a in a_s], axis)
        b = jnp.concatenate([_pad_rank(b, ns, 0, top) for b in b_s], axis)
    names = [p.name for p in parts if isinstance(p, LoraValue)]
    w = jax.lax.concatenate(list(ws), dimension)
    return like.replace(w=w, a=a, b=b, scale=1.0, name=" + ".join(names))


@register("concatenate")
def concatenate_rule(ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
    """Joins kernels along one axis at rank r₁ + r₂ (plain arrays join at rank 0)."""
    return [concatenate(invals, PrimitiveParams(eqn)["dimension"])]
