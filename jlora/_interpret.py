"""Interpreting a jaxpr with adapted kernels carried symbolically (the engine of ``jlora.lora``).

Every equation whose inputs are plain arrays is re-bound exactly as traced, so code that does
not touch an adapted kernel runs unchanged. An equation that receives a :class:`LoraValue`
goes to its rule: moving ops (casts, transposes, reshapes, stack slices) move it; consuming ops
(``dot_general``, ``conv_general_dilated``, ``gather``) compute the factorised result;
higher-order primitives (``jit``, ``remat``, ``scan``, ``while``, ``cond``, custom
derivatives, ``shard_map``) run their bodies through this interpreter again. Anything else is
:class:`Unsupported`: an error naming the primitive and kernel, or, when the caller opted in,
that one use of the kernel is merged (``W + s·A·B``) with a warning.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core
from jax.sharding import PartitionSpec

from jlora import _lazy, _rules
from jlora._lazy import LoraValue, Unsupported
from jlora._primitive_params import PrimitiveParams, scan_operand_counts
from jlora._quantized_view import dense, per_layer, then


@dataclasses.dataclass
class Context:
    """What one interpretation needs besides the jaxpr: the fallback policy and dropout."""

    on_unsupported: str
    dropout: _rules.Dropout

    def child(self, index: Any) -> Context:
        """The context of a loop body (dropout keys vary with the iteration ``index``)."""
        return Context(self.on_unsupported, self.dropout.child(index))


def _is_lazy(x: Any) -> bool:
    return isinstance(x, LoraValue)


def _bind(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


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


def interpret(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], ctx: Context) -> list[Any]:
    """Evaluates ``jaxpr`` on ``args`` (plain arrays or :class:`LoraValue`)."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if not any(_is_lazy(v) for v in invals):
            outs = _bind(eqn, invals)
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
                outs = _bind(eqn, concrete(invals, ctx, name))
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


def _inline(key: str) -> Callable[[Context, Any, list[Any]], list[Any]]:
    def rule(ctx: Context, eqn: Any, invals: list[Any]) -> list[Any]:
        closed = PrimitiveParams(eqn)[key]
        return interpret(closed.jaxpr, closed.consts, invals, ctx)

    return rule


def _remat(ctx: Context, eqn: Any, invals: list[Any]) -> list[Any]:
    arrays, unpack = _pack(invals)
    p = PrimitiveParams(eqn)

    def body(*flat: Any) -> list[Any]:
        outs = interpret(p["jaxpr"], (), unpack(flat), ctx)
        return concrete(outs, ctx, "remat")

    return list(jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*arrays))


def _scan(ctx: Context, eqn: Any, invals: list[Any]) -> list[Any]:
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


def _while(ctx: Context, eqn: Any, invals: list[Any]) -> list[Any]:
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


def _cond(ctx: Context, eqn: Any, invals: list[Any]) -> list[Any]:
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


def _shard_map(ctx: Context, eqn: Any, invals: list[Any]) -> list[Any]:
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


def _move(fn: Callable[..., LoraValue]) -> Callable[[Context, Any, list[Any]], list[Any]]:
    def rule(ctx: Context, eqn: Any, invals: list[Any]) -> list[Any]:
        v, *rest = invals
        if not _is_lazy(v) or any(_is_lazy(r) for r in rest):
            raise Unsupported("an adapted kernel used as an operand other than the array moved")
        return [fn(v, PrimitiveParams(eqn), rest)]

    return rule


def _on_w(v: LoraValue, eqn: Any, rest: list[Any]) -> LoraValue:
    return v.replace(w=then(v.w, lambda w: _bind(eqn, [w, *rest])[0]))


def _reshape(v: LoraValue, p: Mapping[str, Any], _: list[Any]) -> LoraValue:
    if p.get("dimensions") is not None:
        raise Unsupported("a reshape with a dimension permutation")
    return _lazy.reshape(v, p["new_sizes"])


def _broadcast(v: LoraValue, p: Mapping[str, Any], _: list[Any]) -> LoraValue:
    if list(p["broadcast_dimensions"]) != sorted(p["broadcast_dimensions"]):
        raise Unsupported("a broadcast that permutes the kernel's axes")
    return _lazy.broadcast_in_dim(v, p["shape"])


def _on_w_rule(ctx: Context, eqn: Any, invals: list[Any]) -> list[Any]:
    v, *rest = invals
    if not _is_lazy(v) or any(_is_lazy(r) for r in rest):
        raise Unsupported("an adapted kernel used as an operand other than the array moved")
    return [_on_w(v, eqn, rest)]


def _concatenate(ctx: Context, eqn: Any, invals: list[Any]) -> list[Any]:
    return [_lazy.concatenate(invals, PrimitiveParams(eqn)["dimension"])]


def _consume(fn: Callable[..., Any]) -> Callable[[Context, Any, list[Any]], list[Any]]:
    def rule(ctx: Context, eqn: Any, invals: list[Any]) -> list[Any]:
        return [fn(ctx.dropout, PrimitiveParams(eqn), *invals)]

    return rule


RULES: dict[str, Callable[[Context, Any, list[Any]], list[Any]]] = {
    "convert_element_type": _on_w_rule,
    "copy": _on_w_rule,
    "copy_p": _on_w_rule,
    "sharding_constraint": _on_w_rule,
    "transpose": _move(lambda v, p, _: _lazy.transpose(v, p["permutation"])),
    "reshape": _move(_reshape),
    "squeeze": _move(lambda v, p, _: _lazy.squeeze(v, p["dimensions"])),
    "broadcast_in_dim": _move(_broadcast),
    "slice": _move(
        lambda v, p, _: _lazy.slice_(v, p["start_indices"], p["limit_indices"], p["strides"])
    ),
    "dynamic_slice": _move(lambda v, p, rest: _lazy.dynamic_slice(v, rest, p["slice_sizes"])),
    "concatenate": _concatenate,
    "dot_general": _consume(_rules.dot_general),
    "conv_general_dilated": _consume(_rules.conv),
    "gather": lambda ctx, eqn, invals: [_rules.gather(PrimitiveParams(eqn), *invals)],
    "jit": _inline("jaxpr"),
    "pjit": _inline("jaxpr"),
    "closed_call": _inline("call_jaxpr"),
    "custom_jvp_call": _inline("call_jaxpr"),
    "custom_vjp_call": _inline("call_jaxpr"),
    "remat2": _remat,
    "checkpoint": _remat,
    "scan": _scan,
    "while": _while,
    "cond": _cond,
    "shard_map": _shard_map,
}
