"""Interpreting a jaxpr with adapted kernels carried symbolically (the engine of ``jlora.lora``).

Every equation whose inputs are plain arrays is re-bound exactly as traced, so code that does
not touch an adapted kernel runs unchanged. An equation that receives a :class:`LoraValue`
goes to its rule: moving ops (casts, transposes, reshapes, stack slices) move it; consuming ops
(``dot_general``, ``conv_general_dilated``, ``gather``) compute the factorised result;
higher-order primitives (``jit``, ``remat``, ``scan``, ``while``, ``cond``, custom
derivatives, ``shard_map``) run their bodies through this interpreter again. Anything else is
:class:`Unsupported`: an error naming the primitive and kernel, or, when the caller opted in,
that one use of the kernel is merged (``W + s·A·B``) with a warning. The higher-order rules
live here, beside the interpreter they call; the moving and consuming ones in ``moves`` and
``consume``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core
from jax.sharding import PartitionSpec

from jlora._factorised.primitive_params import PrimitiveParams, scan_operand_counts
from jlora._factorised.quantized_view import dense, per_layer
from jlora._factorised.rule import RULES, Context, Rule, Unsupported, bind, register
from jlora._factorised.value import LoraValue


def _is_lazy(x: Any) -> bool:
    return isinstance(x, LoraValue)


def _message(prim: str, v: LoraValue, reason: str) -> str:
    return (
        f"jlora.lora cannot keep the adapted kernel {v.name!r} factorised through primitive "
        f"'{prim}': found {reason}; expected a product (dot/einsum/matmul), a convolution or an "
        "embedding lookup reached through casts, transposes, group-preserving reshapes and stack "
        "slices. Rewrite that use, exclude the kernel from LoraConfig.targets, or pass "
        "on_unsupported='merge' to merge this kernel (W + s·A·B) at that use"
    )


def concrete(vals: Sequence[Any], ctx: Context, prim: str) -> list[Any]:
    """``vals`` with every adapted kernel merged, or an error if merging was not allowed."""
    out = []
    for v in vals:
        if _is_lazy(v):
            reason = "the kernel itself as a result" if prim == "output" else "it"
            if ctx.on_unsupported == "raise":
                raise ValueError(_message(prim, v, reason))
            warnings.warn(
                f"jlora.lora: merged kernel {v.name!r} (W + s·A·B) at primitive '{prim}', as "
                "on_unsupported='merge' allows; this use forms a W-sized weight",
                stacklevel=2,
            )
            v = v.materialise()
        out.append(v)
    return out


def interpret(
    jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any], ctx: Context
) -> list[Any]:
    """Evaluates ``jaxpr`` on ``args`` (plain arrays or :class:`LoraValue`)."""
    env: dict[core.Var, Any] = {}

    def read(v: core.Var | core.Literal) -> Any:
        return v.val if isinstance(v, core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if not any(_is_lazy(v) for v in invals):
            outs = bind(eqn, invals)
        else:
            name = eqn.primitive.name
            try:
                rule = RULES.get(name)
                if rule is None:
                    raise Unsupported("no factorised form of this primitive")
                outs = rule(ctx, eqn, invals)
            except Unsupported as err:
                first = next(v for v in invals if _is_lazy(v))
                if ctx.on_unsupported == "raise":
                    raise ValueError(_message(name, first, str(err))) from None
                outs = bind(eqn, concrete(invals, ctx, name))
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


# ---- packing adapted kernels into plain arrays for higher-order primitives -------------------


def _pack(vals: Sequence[Any]) -> tuple[list[Any], Callable[..., list[Any]]]:
    """Flattens ``vals`` to arrays (each LoraValue to the leaves of w, a, b) and the inverse."""
    arrays: list[Any] = []
    shells: list[Any] = []
    for v in vals:
        if _is_lazy(v):
            leaves, tree = jax.tree.flatten(v.parts())
            shells.append((v, tree, len(leaves)))
            arrays.extend(leaves)
        else:
            shells.append(None)
            arrays.append(v)

    def unpack(flat: Sequence[Any], drop_axis: bool = False) -> list[Any]:
        it = iter(flat)
        out = []
        for shell in shells:
            if shell is None:
                out.append(next(it))
                continue
            v, tree, n = shell
            w, a, b = jax.tree.unflatten(tree, [next(it) for _ in range(n)])
            roles = v.roles[1:] if drop_axis else v.roles
            out.append(v.replace(w=w, a=a, b=b, roles=roles))
        return out

    return arrays, unpack


def _inline(key: str) -> Rule:
    def rule(ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
        closed = PrimitiveParams(eqn)[key]
        return interpret(closed.jaxpr, closed.consts, invals, ctx)

    rule.__doc__ = f"Interprets the body (``{key}``) inline, kernels still factorised."
    return rule


register("jit", "pjit")(_inline("jaxpr"))
# A custom derivative rule was written for a dense W: its body is differentiated instead.
register("closed_call", "custom_jvp_call", "custom_vjp_call")(_inline("call_jaxpr"))


@register("remat2", "checkpoint")
def _remat(ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
    """Interprets the body inside ``jax.checkpoint`` with the same policy; W, A, B as inputs."""
    arrays, unpack = _pack(invals)
    p = PrimitiveParams(eqn)

    def body(*flat: Any) -> list[Any]:
        outs = interpret(p["jaxpr"], (), unpack(flat), ctx)
        return concrete(outs, ctx, "remat")

    return list(jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*arrays))


@register("scan")
def _scan(ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
    """Scans W, A and B over a ``stack`` axis (stacked layers); a kernel in the carry is refused."""
    p = PrimitiveParams(eqn)
    nc, ncar = scan_operand_counts(p)
    consts, init, xs = invals[:nc], invals[nc : nc + ncar], invals[nc + ncar :]
    if any(_is_lazy(v) for v in init):
        raise Unsupported("a kernel in a scan carry")
    for v in xs:
        if _is_lazy(v) and (not v.roles or v.roles[0] != "stack"):
            raise Unsupported(f"a scan over axis 0 of a kernel with roles {v.roles} (not 'stack')")
    # A quantised stack is sliced as codes and scales: each iteration dequantises its layer.
    flat_xs, unpack = _pack([v.replace(w=per_layer(v.w)) if _is_lazy(v) else v for v in xs])
    closed = p["jaxpr"]

    def body(carry: list[Any], x: tuple[Any, list[Any]]) -> tuple[list[Any], list[Any]]:
        index, flat = x
        inner = ctx.child(index)
        outs = interpret(closed.jaxpr, closed.consts, [*consts, *carry, *unpack(flat, True)], inner)
        outs = concrete(outs, ctx, "scan")
        return outs[:ncar], outs[ncar:]

    carry, ys = lax.scan(
        body,
        list(init),
        (jnp.arange(p["length"]), flat_xs),
        length=p["length"],
        reverse=p["reverse"],
        unroll=p["unroll"],
    )
    return [*carry, *ys]


@register("while")
def _while(ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
    """Interprets condition and body with loop-constant kernels; refused in the carry."""
    p = PrimitiveParams(eqn)
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
    if any(_is_lazy(v) for v in init):
        raise Unsupported("a kernel in a while-loop carry")
    cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
    # An iteration counter rides in the carry so LoRA dropout draws new masks every iteration.

    def cond(carry: Any) -> Any:
        return interpret(cj.jaxpr, cj.consts, [*cconsts, *carry[1:]], ctx)[0]

    def body(carry: Any) -> Any:
        i, *rest = carry
        outs = interpret(bj.jaxpr, bj.consts, [*bconsts, *rest], ctx.child(i))
        return (i + 1, *concrete(outs, ctx, "while"))

    return list(lax.while_loop(cond, body, (jnp.int32(0), *init)))[1:]


@register("cond")
def _cond(ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
    """Interprets each branch (``cond``, ``switch``) with the kernels closed over."""
    index, ops = invals[0], invals[1:]
    plain = [v for v in ops if not _is_lazy(v)]

    def branch(closed: Any) -> Callable[..., list[Any]]:
        def run(*args: Any) -> list[Any]:
            it = iter(args)
            vals = [v if _is_lazy(v) else next(it) for v in ops]
            return concrete(interpret(closed.jaxpr, closed.consts, vals, ctx), ctx, "cond")

        return run

    return list(lax.switch(index, [branch(b) for b in PrimitiveParams(eqn)["branches"]], *plain))


def _spec(spec: Any, ndim: int) -> list[Any]:
    entries = list(spec) if spec is not None else []
    return entries + [None] * (ndim - len(entries))


@register("shard_map")
def _shard_map(ctx: Context, eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
    """Interprets the body per shard; A and B are sharded like W's ``in`` and ``out`` axes."""
    p = PrimitiveParams(eqn)
    # The kernel's in_spec describes the dense layout: a quantised base enters dequantised.
    invals = [v.replace(w=dense(v.w)) if _is_lazy(v) else v for v in invals]
    arrays, unpack = _pack(invals)
    specs: list[Any] = []
    for v, spec in zip(invals, p["in_specs"], strict=True):
        if not _is_lazy(v):
            specs.append(spec)
            continue
        per = _spec(spec, len(v.roles))
        group = {r: [per[i] for i in v.group(r)] for r in ("stack", "in", "out")}
        specs += [
            spec,
            PartitionSpec(*group["stack"], *group["in"], None),
            PartitionSpec(*group["stack"], None, *group["out"]),
        ]

    def body(*flat: Any) -> tuple[Any, ...]:
        outs = interpret(p["jaxpr"], (), unpack(flat), ctx)
        return tuple(concrete(outs, ctx, "shard_map"))

    fn = jax.shard_map(
        body,
        mesh=p["mesh"],
        in_specs=tuple(specs),
        out_specs=p["out_specs"],
        axis_names=p["newly_manual_axes"],
        check_vma=p["check_vma"],
    )
    return list(fn(*arrays))
